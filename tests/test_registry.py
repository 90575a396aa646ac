import json

import pytest
import torch

from expander.registry import BUILTIN_REGISTRY, Registry, RegistryError

VALID = {
    "schema_version": 1,
    "default_model": "a",
    "models": {
        "a": {"source": {"package": "world/weights/portraits"}, "resolution": 64, "domains": {"zombie": {"direction": 120, "alpha": 4.0, "method": "nada"}}},
        "b": {"source": {"repo_id": "org/name", "revision": "0123456789abcdef0123456789abcdef01234567"}, "resolution": 1024},
    },
}


def test_shipped_registry_is_valid_and_default_model_loads():
    registry = Registry.load(BUILTIN_REGISTRY)
    assert registry.default_model in registry.models
    from expander.hub import load_model

    model = load_model()  # the default model, offline
    entry = registry.models[registry.default_model]
    assert model.generator.resolution == entry.resolution
    assert set(model.domain_names) == set(entry.domains)
    for name, spec in entry.domains.items():
        assert model.get_domain(name).direction == spec["direction"]
    from expander.checkpoint import ExpandedGenerator

    by_name = ExpandedGenerator.from_pretrained(registry.default_model)  # a registered name, as load_model takes
    assert all(torch.equal(value, by_name.weights_dict()[key]) for key, value in model.weights_dict().items())


def test_packaged_registry_is_the_top_level_file():
    top_level = BUILTIN_REGISTRY.resolve()
    assert top_level.name == "registry.json" and top_level.parent.name != "expander"


def test_round_trip():
    registry = Registry.from_dict(VALID)
    assert Registry.from_dict(registry.to_dict()).to_dict() == registry.to_dict()
    assert registry.models["b"].location().startswith("org/name@0123456789")


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.update(schema_version=2), "schema_version must be 1"),
        (lambda d: d["models"]["a"]["domains"].update(other={"direction": 120}), "share direction 120"),
        (lambda d: d["models"]["b"]["source"].update(revision="main"), "not a 40-character commit"),
        (lambda d: d["models"]["a"].update(source={"package": "x", "path": "y"}), "exactly one of"),
        (lambda d: d["models"]["a"].update(colour="red"), "unknown keys"),
        (lambda d: d.update(default_model="zzz"), "default_model 'zzz'"),
        (lambda d: d["models"]["a"]["domains"]["zombie"].update(method="magic"), "method must be one of"),
        (lambda d: d["models"]["a"].update(resolution=48), "power of two"),
        (lambda d: d["models"]["a"].update(source={"path": 5}), "source path must be a non-empty text"),
        (lambda d: d["models"]["a"].update(source={"path": "  "}), "source path must be a non-empty text"),
        (lambda d: d["models"]["a"]["domains"]["zombie"].update(alpha=float("inf")), "alpha must be a positive finite number"),
        (lambda d: d["models"]["a"]["domains"]["zombie"].update(alpha=True), "alpha must be a positive finite number"),
        (lambda d: d["models"]["a"]["domains"]["zombie"].update(direction=True), "needs an integer 'direction'"),
    ],
)
def test_invalid_registries_are_refused(mutate, message):
    data = json.loads(json.dumps(VALID))
    mutate(data)
    with pytest.raises(RegistryError, match=message):
        Registry.from_dict(data)


def test_save_refuses_invalid_and_writes_nothing(tmp_path):
    registry = Registry.from_dict(VALID)
    registry.models["a"].domains["twin"] = {"direction": 120}
    with pytest.raises(RegistryError):
        registry.save(tmp_path / "registry.json")
    assert list(tmp_path.iterdir()) == []


def test_a_built_in_name_is_never_registered_by_the_user(tmp_path):
    from expander.registry import ModelEntry, register_user_model, user_registry_path

    with pytest.raises(RegistryError, match="'world-portraits' is a built-in model"):
        register_user_model(ModelEntry("world-portraits", {"path": str(tmp_path)}))
    assert not user_registry_path().exists()


def test_entries_of_a_rewritten_folder_list_its_new_domains(tmp_path, tiny_generator):
    from expander.checkpoint import ExpandedGenerator
    from expander.domains import Domain
    from expander.registry import ModelEntry, load_registries, refresh_user_entries, register_user_model

    folder = tmp_path / "model"
    register_user_model(ModelEntry("mine", {"path": str(folder)}, description="kept"))
    register_user_model(ModelEntry("other", {"path": str(tmp_path / "elsewhere")}))
    model = ExpandedGenerator.from_generator(tiny_generator, num_dormant=8, base_model="tiny")
    model.add_domain(Domain("zombie", direction=-1, prompt="a zombie"))
    assert refresh_user_entries(folder, model) == ["mine"]
    registry = load_registries()
    assert set(registry.models["mine"].domains) == {"zombie"} and registry.models["mine"].description == "kept"
    assert registry.models["other"].domains == {}


def test_runs_that_register_at_the_same_moment_keep_every_entry(tmp_path, monkeypatch):
    """Each run reads the user registry, adds its entry and writes it back: without a lock, two runs
    that overlap both read the old file and the later write drops the other's entry."""
    import threading
    import time

    from expander.registry import ModelEntry, load_registries, register_user_model

    load = Registry.load.__func__

    def slow_load(cls, path):  # widen the read-modify-write window so an unlocked update loses entries
        registry = load(cls, path)
        time.sleep(0.05)
        return registry

    monkeypatch.setattr(Registry, "load", classmethod(slow_load))
    register_user_model(ModelEntry("first", {"path": str(tmp_path / "first")}))
    errors = []

    def register(index):
        try:
            register_user_model(ModelEntry(f"run{index}", {"path": str(tmp_path / f"run{index}")}))
        except Exception as err:  # pragma: no cover - reported by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=register, args=(index,)) for index in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert {"first", *(f"run{index}" for index in range(6))} <= set(load_registries().models)


def test_a_registry_locked_for_too_long_is_a_clear_error(monkeypatch):
    from filelock import FileLock

    import expander.registry as registry_module
    from expander.registry import ModelEntry, register_user_model, user_registry_path

    monkeypatch.setattr(registry_module, "REGISTRY_LOCK_TIMEOUT_S", 0.1)
    path = user_registry_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        with pytest.raises(RegistryError, match="is being updated by another expander process"):
            register_user_model(ModelEntry("mine", {"path": "/tmp/mine"}))
    assert not path.exists()


def test_a_run_whose_folder_no_entry_names_leaves_the_registry_alone(tmp_path):
    """Every run refreshes the entries of its output folder; with none to refresh it writes nothing,
    not even the lock file, so a read-only $EXPANDER_HOME does not fail a finished run."""
    from expander.registry import ModelEntry, refresh_user_entries, register_user_model, user_registry_path

    register_user_model(ModelEntry("mine", {"path": str(tmp_path / "mine")}))
    lock = user_registry_path().with_name("registry.json.lock")
    lock.unlink(missing_ok=True)
    before = user_registry_path().read_bytes()
    assert refresh_user_entries(tmp_path / "other", model=None) == []
    assert user_registry_path().read_bytes() == before and not lock.exists()


def test_a_broken_user_registry_entry_is_named_with_the_way_out(tmp_path):
    from expander.registry import load_registries, user_registry_path

    path = user_registry_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(json.dumps(VALID))
    data["models"]["a"]["domains"]["zombie"]["method"] = "magic"
    path.write_text(json.dumps(data))
    with pytest.raises(RegistryError, match=r"method must be one of.*fix the file by hand, or remove the broken model entry"):
        load_registries()


def test_a_name_taken_while_a_model_was_made_is_not_taken_over(tmp_path):
    """Runs check that their name is free before training, outside the lock; a run that registers the
    name in the meantime keeps it, and the later one says where its model is and how to name it."""
    from expander.registry import ModelEntry, check_name_available, expander_home, load_registries, register_user_model

    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir()
    theirs.mkdir()
    check_name_available("mine", {"path": str(ours)}, "trained")  # free when our run starts
    register_user_model(ModelEntry("mine", {"path": str(theirs)}))  # another run with the same name finishes first
    with pytest.raises(RegistryError, match=rf"saved the model in {ours} but did not register it: 'mine' is already the registered name of another model \({theirs}\)\. Use it by its folder \(--model {ours}\), or train it again with --name OTHER_NAME"):
        register_user_model(ModelEntry("mine", {"path": str(ours)}))
    assert load_registries().models["mine"].source == {"path": str(theirs)}
    with pytest.raises(RegistryError, match=r"downloaded org/b@cccccccccc into the Hugging Face cache but did not register it.*`expander pull org/b --revision c{40} --name OTHER_NAME`"):
        register_user_model(ModelEntry("mine", {"repo_id": "org/b", "revision": "c" * 40}))  # a pull racing the run

    # The model's own new versions are no takeover: its folder again (a re-run), and add-domain in place,
    # which writes a registered model's new version to $EXPANDER_HOME/models/NAME and points the name there
    # (its caller says so: any other run writing to that folder is refused like any other).
    register_user_model(ModelEntry("mine", {"path": str(theirs)}, description="re-run"))
    in_place = ModelEntry("mine", {"path": str(expander_home() / "models" / "mine")}, description="in place")
    with pytest.raises(RegistryError, match="already the registered name of another model"):
        register_user_model(in_place)
    register_user_model(in_place, new_version=True)
    assert load_registries().models["mine"].description == "in place"
    register_user_model(ModelEntry("hub", {"repo_id": "org/a", "revision": "a" * 40}))
    register_user_model(ModelEntry("hub", {"repo_id": "org/a", "revision": "b" * 40}))  # a later pull of the same repo
    register_user_model(ModelEntry("hub", {"path": str(expander_home() / "models" / "hub")}), new_version=True)  # add-domain in place on a pulled model
    register_user_model(ModelEntry("gone", {"path": str(tmp_path / "deleted")}))
    register_user_model(ModelEntry("gone", {"path": str(ours)}))  # an entry whose folder is gone is free
    assert load_registries().models["gone"].source == {"path": str(ours)}
