"""Pulling and loading from a Hugging Face cache that the test builds itself (HF_HUB_OFFLINE=1)."""

import json
from fnmatch import fnmatch
from pathlib import Path

import pytest
import torch

from expander.checkpoint import ExpandedGenerator
from expander.domains import Domain
from expander.hub import ModelNotFoundError, pull, resolve_model_folder
from expander.registry import Registry, user_registry_path

COMMIT = "a" * 40


@pytest.fixture
def hub_cache(tmp_path, tiny_generator, monkeypatch):
    """A cache folder laid out like huggingface_hub's: models--org--tiny/{refs/main, snapshots/<sha>/...}."""
    cache = tmp_path / "hf-cache"
    repo = cache / "models--org--tiny"
    snapshot = repo / "snapshots" / COMMIT
    model = ExpandedGenerator.from_generator(tiny_generator, num_dormant=8, base_model="tiny")
    model.add_domain(Domain("zombie", direction=-1, prompt="a zombie"))
    model.save_pretrained(snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    return cache, model


def test_pull_records_pinned_commit_and_loads(hub_cache):
    _, original = hub_cache
    entry = pull("org/tiny", revision="main")
    assert entry.source == {"repo_id": "org/tiny", "revision": COMMIT}
    assert entry.domains == {"zombie": {"direction": original.get_domain("zombie").direction, "alpha": original.alpha, "method": "nada"}}
    registry = Registry.load(user_registry_path())
    assert "tiny" in registry.models
    from expander.hub import load_model

    loaded = load_model("tiny")
    torch.testing.assert_close(loaded.sample("zombie", n=2), original.sample("zombie", n=2))
    # A repo id works directly too, from the same cache.
    folder, _ = resolve_model_folder("org/tiny")
    assert folder.name == COMMIT


def test_pull_of_a_broken_repo_records_nothing(hub_cache):
    cache, _ = hub_cache
    snapshot = cache / "models--org--tiny" / "snapshots" / COMMIT
    (snapshot / "domains.json").write_text(json.dumps({"domains": [{"name": "a", "direction": 999}]}))
    with pytest.raises(ValueError, match="out of range"):
        pull("org/tiny")
    assert not user_registry_path().exists()


def test_unknown_model_message(hub_cache):
    with pytest.raises(ModelNotFoundError, match="not a registered model"):
        resolve_model_folder("definitely not a model")
    with pytest.raises(Exception):
        pull("org/missing")  # not in the cache and offline
    assert not user_registry_path().exists()


def test_a_pinned_commit_loads_from_the_cache_without_asking_the_hub(hub_cache, monkeypatch):
    import expander.hub as hub
    from huggingface_hub.utils import LocalEntryNotFoundError

    pull("org/tiny", revision="main")
    real_download, calls = hub.snapshot_download, []

    def cache_only(**kwargs):  # what older huggingface_hub releases do offline: ask the Hub for the commit
        calls.append(kwargs.get("local_files_only", False))
        if not kwargs.get("local_files_only"):
            raise AssertionError("asked the Hub for a commit that is in the cache")
        return real_download(**kwargs)

    monkeypatch.setattr(hub, "snapshot_download", cache_only)
    assert hub.load_model("tiny").get_domain("zombie") is not None and calls == [True]

    def not_cached(**kwargs):
        calls.append(kwargs.get("local_files_only", False))
        if kwargs.get("local_files_only"):
            raise LocalEntryNotFoundError("not in the cache")
        return real_download(**kwargs)

    calls.clear()
    monkeypatch.setattr(hub, "snapshot_download", not_cached)
    assert hub.load_model("tiny").get_domain("zombie") is not None and calls == [True, False]  # then downloaded


def test_an_interrupted_pull_is_completed_not_loaded_half(hub_cache, monkeypatch):
    import expander.hub as hub

    cache, _ = hub_cache
    pull("org/tiny", revision="main")
    weights = cache / "models--org--tiny" / "snapshots" / COMMIT / "model.safetensors"
    kept = weights.read_bytes()
    weights.unlink()  # as if the pull had stopped before the weights
    real_download, calls = hub.snapshot_download, []

    def download(**kwargs):
        calls.append(kwargs.get("local_files_only", False))
        if not kwargs.get("local_files_only"):
            weights.write_bytes(kept)  # what the Hub would send
        return real_download(**kwargs)

    monkeypatch.setattr(hub, "snapshot_download", download)
    assert hub.load_model("tiny").get_domain("zombie") is not None and calls == [True, False]


@pytest.mark.parametrize("unfinished", ["domains.json missing", "a download stopped half-way"])
def test_a_cached_snapshot_short_of_a_file_is_completed(hub_cache, monkeypatch, unfinished):
    import expander.hub as hub

    cache, _ = hub_cache
    pull("org/tiny", revision="main")
    repo = cache / "models--org--tiny"
    if unfinished == "domains.json missing":
        (repo / "snapshots" / COMMIT / "domains.json").rename(repo / "kept")
    else:
        (repo / "blobs").mkdir(exist_ok=True)
        (repo / "blobs" / "0123abcd.incomplete").write_bytes(b"half of training.json")
    real_download, calls = hub.snapshot_download, []

    def download(**kwargs):
        calls.append(kwargs.get("local_files_only", False))
        if not kwargs.get("local_files_only"):  # what the Hub would do: finish the files
            if (repo / "kept").exists():
                (repo / "kept").rename(repo / "snapshots" / COMMIT / "domains.json")
            for partial in (repo / "blobs").glob("*.incomplete") if (repo / "blobs").exists() else []:
                partial.unlink()
        return real_download(**kwargs)

    monkeypatch.setattr(hub, "snapshot_download", download)
    assert hub.load_model("tiny").get_domain("zombie") is not None and calls == [True, False]


class _FakeHubApi:
    """Stands in for huggingface_hub.HfApi: records what push asks for, uploads nothing."""

    existing: dict = {}
    created: list = []
    uploads: list = []

    def __init__(self, token=None):
        pass

    def create_repo(self, repo_id, private=None, exist_ok=False, repo_type="model"):
        self.created.append((repo_id, private))
        self.existing.setdefault(repo_id, bool(private))  # like the Hub: an existing repo keeps its visibility

    def repo_info(self, repo_id, repo_type="model"):
        return type("RepoInfo", (), {"private": self.existing[repo_id]})()

    def upload_folder(self, repo_id, folder_path, commit_message, repo_type="model", allow_patterns=None, delete_patterns=None):
        files = sorted(p.name for p in Path(folder_path).iterdir() if allow_patterns is None or any(fnmatch(p.name, pattern) for pattern in allow_patterns))
        self.uploads.append((repo_id, files, delete_patterns))
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/{COMMIT}"})()


@pytest.fixture
def fake_hub(monkeypatch):
    import expander.hub

    monkeypatch.setattr(_FakeHubApi, "existing", {"me/public": False})
    monkeypatch.setattr(_FakeHubApi, "created", [])
    monkeypatch.setattr(_FakeHubApi, "uploads", [])
    monkeypatch.setattr(expander.hub, "HfApi", _FakeHubApi)
    return _FakeHubApi


def test_push_uploads_a_checkpoint_and_never_publishes_a_private_push(hub_cache, tmp_path, fake_hub):
    from expander.hub import push

    _, model = hub_cache
    model.save_pretrained(tmp_path / "mine")
    assert push(str(tmp_path / "mine"), "me/new", private=True).endswith(COMMIT)
    assert fake_hub.existing["me/new"] is True and [repo for repo, _, _ in fake_hub.uploads] == ["me/new"]
    with pytest.raises(ValueError, match="already exists and is public, so nothing was uploaded"):
        push(str(tmp_path / "mine"), "me/public", private=True)
    assert len(fake_hub.uploads) == 1
    push(str(tmp_path / "mine"), "me/public")  # without --private a public repo is what was asked for
    assert len(fake_hub.uploads) == 2


def test_push_uploads_only_the_checkpoint_and_clears_an_earlier_ones_files(hub_cache, tmp_path, fake_hub):
    from expander.hub import HUB_FILES, push

    _, model = hub_cache
    model.save_pretrained(tmp_path / "mine")
    (tmp_path / "mine" / "notes.txt").write_text("my private notes")
    push(str(tmp_path / "mine"), "me/new")
    ((repo, files, delete_patterns),) = fake_hub.uploads
    assert files == sorted(p.name for p in (tmp_path / "mine").iterdir() if p.name != "notes.txt") and "model.safetensors" in files
    # an earlier model's discriminator or training log in the repo goes in the same commit
    assert delete_patterns == HUB_FILES and "discriminator.safetensors" in HUB_FILES
    # without --private a new repo gets the owner's default visibility, not an explicit "public"
    assert fake_hub.created == [("me/new", None)]


def test_model_push_to_hub_has_the_checks_of_expander_push(hub_cache, fake_hub):
    _, model = hub_cache
    assert model.push_to_hub("me/new", private=True).endswith(COMMIT)
    ((repo, files, _),) = fake_hub.uploads
    assert repo == "me/new" and fake_hub.existing["me/new"] is True and {"config.json", "model.safetensors", "domains.json"} <= set(files)
    with pytest.raises(ValueError, match="already exists and is public"):
        model.push_to_hub("me/public", private=True)
    with pytest.raises(TypeError, match="unsupported arguments \\['create_pr'\\]"):
        model.push_to_hub("me/new", create_pr=True)
    assert len(fake_hub.uploads) == 1


def test_pull_refuses_a_name_another_model_has_before_downloading(hub_cache, tmp_path, monkeypatch):
    import expander.hub as hub
    from expander.registry import RegistryError, entry_for_model, register_user_model

    _, model = hub_cache
    model.save_pretrained(tmp_path / "mine")
    register_user_model(entry_for_model("tiny", {"path": str(tmp_path / "mine")}, model))
    pull("org/tiny", name="tiny-hub")
    pull("org/tiny", name="tiny-hub")  # the same repo again: its entry is updated

    def no_download(**kwargs):
        raise AssertionError("downloaded before the name was checked")

    monkeypatch.setattr(hub, "snapshot_download", no_download)
    with pytest.raises(RegistryError, match="'tiny' is already the registered name of another model .*mine.*choose another name with --name"):
        pull("org/tiny")  # the default name is the repo's: taken by the local folder
    with pytest.raises(RegistryError, match="built-in model"):
        pull("org/tiny", name="world-portraits")
    assert Registry.load(user_registry_path()).models["tiny"].source == {"path": str(tmp_path / "mine")}


def test_a_registered_hub_model_takes_the_download_options_but_not_a_revision(hub_cache, monkeypatch):
    import expander.hub as hub

    pull("org/tiny")
    real_download, calls = hub.snapshot_download, []

    def recording(**kwargs):
        calls.append(kwargs)
        return real_download(**kwargs)

    monkeypatch.setattr(hub, "snapshot_download", recording)
    assert ExpandedGenerator.from_pretrained("tiny", token="hf_secret", local_files_only=True).get_domain("zombie") is not None
    assert calls and all(call["token"] == "hf_secret" and call["local_files_only"] and call["allow_patterns"] == hub.HUB_FILES for call in calls)
    with pytest.raises(ValueError, match="'tiny' is a registered model \\(org/tiny@aaaaaaaaaa\\), so revision='main' cannot apply"):
        ExpandedGenerator.from_pretrained("tiny", revision="main")


def test_a_pull_whose_registry_cannot_be_written_says_so(hub_cache, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("EXPANDER_HOME", str(tmp_path / "file" / "home"))
    with pytest.raises(ValueError, match="downloaded org/tiny but could not record it in the user registry"):
        pull("org/tiny")


def test_a_pull_whose_name_was_taken_while_downloading_keeps_the_other_model(hub_cache, tmp_path, monkeypatch):
    """The name is free when the pull starts, but a training run registers it before the download ends:
    the pull must not replace that run's entry, and says how to register its snapshot under another name."""
    import expander.hub as hub
    from expander.registry import RegistryError, entry_for_model, register_user_model

    _, model = hub_cache
    model.save_pretrained(tmp_path / "trained")
    real_download = hub.snapshot_download

    def download_while_a_run_finishes(**kwargs):
        register_user_model(entry_for_model("tiny", {"path": str(tmp_path / "trained")}, model))
        return real_download(**kwargs)

    monkeypatch.setattr(hub, "snapshot_download", download_while_a_run_finishes)
    with pytest.raises(RegistryError, match=f"downloaded org/tiny@aaaaaaaaaa .* but did not register it: 'tiny' is already the registered name of another model .*trained.*`expander pull org/tiny --revision {COMMIT} --name OTHER_NAME`"):
        pull("org/tiny")
    assert Registry.load(user_registry_path()).models["tiny"].source == {"path": str(tmp_path / "trained")}
    monkeypatch.setattr(hub, "snapshot_download", real_download)
    assert pull("org/tiny", revision=COMMIT, name="tiny-hub").source == {"repo_id": "org/tiny", "revision": COMMIT}  # as the error says


def test_a_file_given_as_the_model_says_what_to_pass_instead(hub_cache, tmp_path, monkeypatch):
    _, model = hub_cache
    model.save_pretrained(tmp_path / "c")
    torch.save({"g_ema": {}}, tmp_path / "dict.pt")
    (tmp_path / "ffhq.pkl").write_bytes(b"not read")
    (tmp_path / "notes.txt").write_text("not a model")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError, match=r"'\./c/model\.safetensors' is a file of the model folder \./c: pass the folder itself \(--model \./c\)"):
        resolve_model_folder("./c/model.safetensors")
    with pytest.raises(ModelNotFoundError, match=r"'dict\.pt' is a checkpoint file, not an expander model folder: convert it first with `expander import dict\.pt --out DIR`"):
        resolve_model_folder("dict.pt")
    with pytest.raises(ModelNotFoundError, match=r"`expander import .*ffhq\.pkl --out DIR --allow-pickle`"):
        ExpandedGenerator.from_pretrained(str(tmp_path / "ffhq.pkl"))
    with pytest.raises(ModelNotFoundError, match=r"'notes\.txt' is a file, not a model folder"):
        resolve_model_folder("notes.txt")
    assert resolve_model_folder("./c")[0] == tmp_path / "c"  # the folder, as the error says


def test_a_pulled_model_whose_cache_was_deleted_says_how_to_fetch_it_again(hub_cache):
    import shutil

    from expander.hub import load_model

    cache, _ = hub_cache
    pull("org/tiny", revision="main", name="mine")
    shutil.rmtree(cache / "models--org--tiny")  # e.g. `hf cache delete`, then offline
    with pytest.raises(ModelNotFoundError, match=f"model 'mine' is registered as org/tiny at commit {COMMIT}, but that snapshot is not in the Hugging Face cache") as caught:
        load_model("mine")
    assert f"`expander pull org/tiny --revision {COMMIT} --name mine`" in str(caught.value)


def test_a_revision_for_a_local_folder_is_refused(hub_cache, tmp_path):
    _, model = hub_cache
    model.save_pretrained(tmp_path / "mine")
    with pytest.raises(ValueError, match=r"is a local folder \(.*mine\), so revision='v2' cannot apply to it: a revision pins a commit of a Hub repo"):
        ExpandedGenerator.from_pretrained(str(tmp_path / "mine"), revision="v2")
    with pytest.raises(ValueError, match="so revision='v2' cannot apply"):
        resolve_model_folder(str(tmp_path / "mine"), revision="v2")
    assert ExpandedGenerator.from_pretrained(str(tmp_path / "mine")).get_domain("zombie") is not None
