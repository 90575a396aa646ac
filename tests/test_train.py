import json
import re

import pytest
import torch
import torch.nn.functional as F

from expander.checkpoint import ExpandedGenerator
from expander.domains import Domain
from expander.guidance.clip import ClipGuidance
from expander.train import ExpansionConfig, Expander, Guidance, expand


def pixel_distance(a, b):
    return (a - b).abs().mean(dim=(1, 2, 3))


@pytest.fixture
def model(tiny_generator, tiny_discriminator):
    model = ExpandedGenerator.from_generator(tiny_generator, tiny_discriminator, alpha=3.0, num_dormant=8)
    model.add_domain(Domain("zombie", direction=-1, prompt="a zombie"))
    model.add_domain(Domain("sketch", direction=-1, prompt="a sketch"))
    return model


@pytest.fixture
def guidance(tiny_clip_dir):
    return Guidance(perceptual=pixel_distance, clip=ClipGuidance.from_pretrained([str(tiny_clip_dir)]))


SMALL = dict(steps=4, batch_size=2, base_batch_size=2, checkpoint_every=2)


def test_nada_step_trains_synthesis_only(model, guidance):
    mapping_before = {k: v.clone() for k, v in model.generator.style.state_dict().items()}
    synthesis_before = [p.clone() for p in model.generator.synthesis_parameters()]
    trainer = Expander(model, list(model.domains), guidance, ExpansionConfig(**SMALL))
    losses = trainer.step()
    assert set(losses) == {"loss_replay_l2", "loss_replay_perceptual", "loss_nada"}
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    for k, v in model.generator.style.state_dict().items():
        assert torch.equal(v, mapping_before[k]), k
    assert any(not torch.equal(a, b) for a, b in zip(synthesis_before, model.generator.synthesis_parameters()))


def test_dual_basis_step_uses_the_other_domains_directions(model, guidance):
    trainer = Expander(model, list(model.domains), guidance, ExpansionConfig(**SMALL, nada_contrast=0.0, nada_dual_ridge=0.1))
    losses = trainer.step()
    assert torch.isfinite(torch.tensor(losses["loss_nada"]))
    keys = [key for key in guidance.clip._directions if key[-1] == 0.1]  # (encoder, source, target, contrast, strength, ridge)
    assert {(key[2], key[3]) for key in keys} == {("a zombie", ("a sketch",)), ("a sketch", ("a zombie",))}


def _real_renders(n, rng):
    return torch.rand(n, 3, 16, 16, generator=rng) * 2 - 1


@pytest.mark.parametrize(
    "schedule, real",
    [({}, None), ({"lr_decay_start": 1, "lr_decay_steps": 2}, None), ({"r1_every": 2}, _real_renders)],
    ids=["constant-lr", "lr-decay", "gan-and-r1"],
)
def test_resume_gives_the_same_weights(model, guidance, tmp_path, schedule, real):
    reference = ExpandedGenerator.from_pretrained  # a pristine copy of the input model each time
    model.save_pretrained(tmp_path / "start")
    a = reference(tmp_path / "start")
    expand(a, list(a.domains), guidance, ExpansionConfig(**SMALL, **schedule), real_sampler=real, progress=False)
    b = reference(tmp_path / "start")
    expand(b, list(b.domains), guidance, ExpansionConfig(**{**SMALL, **schedule, "steps": 2}), state_dir=tmp_path / "state", real_sampler=real, progress=False)
    c = reference(tmp_path / "start")  # a fresh process would reload the input model, then the state
    expand(c, list(c.domains), guidance, ExpansionConfig(**SMALL, **schedule), state_dir=tmp_path / "state", resume=True, real_sampler=real, progress=False)
    for key, value in a.weights_dict().items():
        assert torch.equal(value, c.weights_dict()[key]), key
    if real is not None:  # the discriminator and its optimizer resume too
        start = reference(tmp_path / "start").discriminator.state_dict()
        assert any(not torch.equal(value, start[key]) for key, value in a.discriminator.state_dict().items()), "the GAN path trained"
        for key, value in a.discriminator.state_dict().items():
            assert torch.equal(value, c.discriminator.state_dict()[key]), key
    assert [d.steps for d in c.domains] == [4, 4]


def test_resume_in_another_numeric_environment_continues_with_a_warning(model, guidance, tmp_path, caplog):
    model.save_pretrained(tmp_path / "start")
    fresh = lambda: ExpandedGenerator.from_pretrained(tmp_path / "start")  # noqa: E731
    first = fresh()
    expand(first, list(first.domains), guidance, ExpansionConfig(**{**SMALL, "steps": 2}), state_dir=tmp_path / "state", progress=False)
    saved = json.loads((tmp_path / "state" / "state.json").read_text())["numerics"]
    assert saved == {"torch": torch.__version__, "device": "cpu", "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_threads": torch.get_num_threads()}

    with caplog.at_level("WARNING", logger="expander"):
        same = fresh()
        expand(same, list(same.domains), guidance, ExpansionConfig(**SMALL), state_dir=tmp_path / "state", resume=True, progress=False)
    assert not [r for r in caplog.records if "numeric environment" in r.getMessage()]

    again = fresh()  # a state saved at step 2 again, since the resume above finished and replaced it
    expand(again, list(again.domains), guidance, ExpansionConfig(**{**SMALL, "steps": 2}), state_dir=tmp_path / "state", progress=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        with caplog.at_level("WARNING", logger="expander"):
            other = fresh()
            expand(other, list(other.domains), guidance, ExpansionConfig(**SMALL), state_dir=tmp_path / "state", resume=True, progress=False)
    finally:
        torch.set_num_threads(threads)
    (warning,) = [r.getMessage() for r in caplog.records if "numeric environment" in r.getMessage()]
    assert f"cpu_threads: {threads} in the state, {threads + 1} now" in warning
    assert f"resume at {threads} threads (OMP_NUM_THREADS={threads}" in warning
    assert [d.steps for d in other.domains] == [4, 4], "the run still continues"

    state_json = tmp_path / "state" / "state.json"
    for numerics, expected in (
        ({**saved, "torch": "1.0.0"}, "torch: 1.0.0 in the state"),  # another build too: threads alone would not match it
        (None, None),  # a state saved before the record: nothing to compare, nothing said
    ):
        caplog.clear()
        again = fresh()
        expand(again, list(again.domains), guidance, ExpansionConfig(**{**SMALL, "steps": 2}), state_dir=tmp_path / "state", progress=False)
        meta = json.loads(state_json.read_text())
        meta.pop("numerics")
        state_json.write_text(json.dumps({**meta, **({"numerics": numerics} if numerics else {})}))
        with caplog.at_level("WARNING", logger="expander"):
            resumed = fresh()
            expand(resumed, list(resumed.domains), guidance, ExpansionConfig(**SMALL), state_dir=tmp_path / "state", resume=True, progress=False)
        warnings = [r.getMessage() for r in caplog.records if "numeric environment" in r.getMessage()]
        if expected is None:
            assert not warnings
        else:
            (warning,) = warnings
            assert expected in warning and "OMP_NUM_THREADS" not in warning


def test_resume_refuses_a_state_of_another_run(model, guidance, tmp_path):
    model.save_pretrained(tmp_path / "start")
    fresh = lambda: ExpandedGenerator.from_pretrained(tmp_path / "start")  # noqa: E731
    first = fresh()
    expand(first, list(first.domains), guidance, ExpansionConfig(**{**SMALL, "steps": 2}), state_dir=tmp_path / "state", progress=False)
    state = (tmp_path / "state" / "state.safetensors").read_bytes()

    other_lr = fresh()
    with pytest.raises(ValueError, match=r"other settings \(lr: 0.002 in the state, 0.001 now\)"):
        expand(other_lr, list(other_lr.domains), guidance, ExpansionConfig(**{**SMALL, "lr": 0.001}), state_dir=tmp_path / "state", resume=True, progress=False)
    other_prompt = fresh()
    other_prompt.get_domain("zombie").prompt = "a ghoul"
    with pytest.raises(ValueError, match="trained domains: their prompts, methods, directions or alphas differ"):
        expand(other_prompt, list(other_prompt.domains), guidance, ExpansionConfig(**SMALL), state_dir=tmp_path / "state", resume=True, progress=False)
    one_domain = fresh()
    with pytest.raises(ValueError, match="trained domains: zombie, sketch in the state, zombie now; replayed domains: none in the state, sketch now"):
        expand(one_domain, [one_domain.get_domain("zombie")], guidance, ExpansionConfig(**SMALL), state_dir=tmp_path / "state", resume=True, progress=False)
    fewer_steps = fresh()
    with pytest.raises(ValueError, match="at step 2, past this run's 1 steps"):
        expand(fewer_steps, list(fewer_steps.domains), guidance, ExpansionConfig(**{**SMALL, "steps": 1}), state_dir=tmp_path / "state", resume=True, progress=False)
    state_json = tmp_path / "state" / "state.json"
    saved_info = state_json.read_text()
    info = json.loads(saved_info)
    info["info"]["num_processes"] = 2  # as a 2-process accelerate launch saves it
    state_json.write_text(json.dumps(info))
    two_processes = fresh()
    with pytest.raises(ValueError, match=r"processes: 2 in the state, 1 now"):
        expand(two_processes, list(two_processes.domains), guidance, ExpansionConfig(**SMALL), state_dir=tmp_path / "state", resume=True, progress=False)
    # A state saved before a setting existed ran as its default: setting it otherwise is another run.
    info = json.loads(saved_info)
    del info["info"]["config"]["negative_prompts"], info["info"]["config"]["lambda_nada_negative"]
    state_json.write_text(json.dumps(info))
    steered = fresh()
    with pytest.raises(ValueError, match=r"negative_prompts: \{\} in the state, \{'zombie': \['a sketch'\]\} now"):
        expand(steered, list(steered.domains), guidance, ExpansionConfig(**SMALL, negative_prompts={"zombie": ["a sketch"]}), state_dir=tmp_path / "state", resume=True, progress=False)
    state_json.write_text(saved_info)
    assert (tmp_path / "state" / "state.safetensors").read_bytes() == state  # a refused resume leaves the state as it was
    # Steps and the checkpoint interval may change: continuing for more steps is what --steps is for.
    more = fresh()
    expand(more, list(more.domains), guidance, ExpansionConfig(**{**SMALL, "checkpoint_every": 3}), state_dir=tmp_path / "state", resume=True, progress=False)
    assert [d.steps for d in more.domains] == [4, 4]


def test_lr_decay_follows_the_step_index_for_generator_and_discriminator(model, guidance):
    config = ExpansionConfig(**SMALL, lr=0.01, lr_decay_start=1, lr_decay_steps=2, lr_final_ratio=0.2)
    assert [config.lr_scale(step) for step in range(5)] == pytest.approx([1.0, 1.0, 0.6, 0.2, 0.2])  # cosine, then held
    assert ExpansionConfig(**SMALL).lr_scale(10**6) == 1.0  # no decay unless asked for
    real = lambda n, rng: torch.rand(n, 3, 16, 16, generator=rng) * 2 - 1  # noqa: E731
    trainer = Expander(model, [model.get_domain("zombie")], guidance, config, real_sampler=real)
    d_lr = trainer.optimizers["D"].param_groups[0]["lr"]  # lazy R1 scales the discriminator's lr
    for expected in [1.0, 1.0, 0.6]:
        trainer.step()
        assert trainer.optimizers["G"].param_groups[0]["lr"] == pytest.approx(0.01 * expected)
        assert trainer.optimizers["D"].param_groups[0]["lr"] == pytest.approx(d_lr * expected)
    for bad, message in [({"lr_final_ratio": 0.0}, "lr_final_ratio must be in"), ({"lr_decay_steps": -1}, "lr_decay_steps must be at least 0")]:
        with pytest.raises(ValueError, match=message):
            ExpansionConfig(**SMALL, **bad)


def test_gan_loss_with_real_images(model, guidance):
    real = lambda n, rng: torch.rand(n, 3, 16, 16, generator=rng) * 2 - 1  # noqa: E731
    trainer = Expander(model, [model.get_domain("zombie")], guidance, ExpansionConfig(**SMALL), real_sampler=real)
    losses = trainer.step()
    assert "loss_gan" in losses and len(trainer.replayed) == 1


def test_bad_domains_are_refused(model, guidance):
    model.add_domain(Domain("empty", direction=-1, prompt="  "))
    with pytest.raises(ValueError, match="non-empty prompt"):
        Expander(model, [model.get_domain("empty")], guidance)
    with pytest.raises(ValueError, match="must be added"):
        Expander(model, [Domain("ghost", direction=1, prompt="x")], guidance)
    with pytest.raises(ValueError, match="no CLIP"):
        Expander(model, [model.get_domain("zombie")], Guidance(perceptual=pixel_distance))


def test_composition_groups_compare_with_the_partner_subspace(model, guidance):
    trainer = Expander(model, list(model.domains), guidance, ExpansionConfig(**SMALL, compositions_per_step=3))
    groups = trainer._groups()
    composed = [g for g in groups if g.w_reference is not None]
    assert len(groups) == 2 + 3 and len(composed) == 3
    for group in composed:
        partner = next(d for d in model.domains if d.name != group.domain.name)
        # reference = base + partner's offset; the trained latent adds the domain's own offset on top
        assert torch.allclose(group.reference, group.w_base + trainer._offset(partner))
        assert torch.allclose(group.w_domain, group.reference + trainer._offset(group.domain))
    assert all(g.reference is g.w_base for g in groups if g.w_reference is None)
    losses = trainer.step()
    assert torch.isfinite(torch.tensor(losses["loss_nada"]))


def test_image_exclusive_hinge_compares_the_domains_of_one_step(model, guidance):
    trainer = Expander(model, list(model.domains), guidance, ExpansionConfig(**SMALL, lambda_nada_image_exclusive=0.5))
    losses = trainer.step()
    assert {"loss_nada", "loss_nada_image_exclusive"} <= set(losses)
    assert losses["loss_nada_image_exclusive"] >= 0 and torch.isfinite(torch.tensor(losses["loss_nada_image_exclusive"]))
    alone = Expander(model, [model.get_domain("zombie")], guidance, ExpansionConfig(**SMALL, lambda_nada_image_exclusive=0.5))
    assert alone.step()["loss_nada_image_exclusive"] == 0.0  # no other NADA domain trained in the step


def test_negative_prompt_hinge_pays_only_for_moving_towards_what_the_negative_adds(guidance):
    from expander.losses import loss_nada_negative

    encoder = guidance.clip.encoders[0]
    negatives = guidance.clip.exclusive_directions(encoder, "a person", "a zombie", ["a person with glasses", "a sketch"])  # (2, D)
    own = guidance.clip.text_direction(encoder, "a person", "a zombie")  # (D,)
    assert negatives @ own == pytest.approx(torch.zeros(2), abs=1e-5)  # what the negative shares with the target stays free
    towards = torch.stack([negatives[0], own, -negatives[0] - negatives[1]])  # (3, D) image directions
    hinge = loss_nada_negative(guidance.clip, [towards], "a person", "a zombie", ["a person with glasses", "a sketch"])
    expected = (towards @ negatives.T).relu().sum(-1).mean()
    assert hinge.item() == pytest.approx(expected.item()) and hinge > 0
    assert loss_nada_negative(guidance.clip, [towards[1:2]], "a person", "a zombie", ["a person with glasses"]).item() == pytest.approx(0, abs=1e-5)
    assert loss_nada_negative(guidance.clip, [towards], "a person", "a zombie", []).item() == 0
    image = towards.clone().requires_grad_(True)
    loss_nada_negative(guidance.clip, [image], "a person", "a zombie", ["a person with glasses"]).backward()
    assert image.grad[0].norm() > 0 and image.grad[2].abs().max() == 0  # only rows that move towards it


def test_negative_prompts_add_a_term_for_their_domain_and_change_nothing_else(model, guidance):
    def losses(**settings):  # no step: the model is unchanged between the two
        torch.manual_seed(0)
        return Expander(model, list(model.domains), guidance, ExpansionConfig(**SMALL, **settings)).losses()

    plain = losses()
    steered = losses(negative_prompts={"zombie": ["a person with glasses"]}, lambda_nada_negative=2.0)
    assert "loss_nada_negative" not in plain and steered["loss_nada_negative"] >= 0
    # The hinge draws nothing from the RNG: every other term is the same, so runs without negatives are unchanged.
    assert {k: v.item() for k, v in plain.items()} == {k: v.item() for k, v in steered.items() if k != "loss_nada_negative"}
    half = losses(negative_prompts={"zombie": ["a person with glasses"]}, lambda_nada_negative=1.0)
    assert steered["loss_nada_negative"].item() == pytest.approx(2 * half["loss_nada_negative"].item())


@pytest.mark.parametrize("negatives, settings, message", [
    ({"ghost": ["a person with glasses"]}, {}, "it is not trained in this run"),
    ({"zombie": ["a zombie"]}, {}, "lists its own prompt 'a zombie'"),
    ({"zombie": ["A  Zombie "]}, {}, "lists its own prompt 'a zombie' among its negative prompts (as 'A  Zombie')"),
    ({"sketch": ["a zombie"]}, {"domain_weights": {"zombie": {"lambda_nada_negative": 2.0}}}, "lambda_nada_negative of domains ['zombie'] does nothing: they have no negative prompts"),
    ({"zombie": ["a person with glasses"]}, {"domain_weights": {"zombie": {"lambda_nada_negative": 0.0}}}, "its lambda_nada_negative is 0"),
    ({"zombie": []}, {}, "non-empty list of non-blank texts"),
    ({"zombie": "a person with glasses"}, {}, "non-empty list of non-blank texts"),
    (["a person with glasses"], {}, "must map a domain name"),
])
def test_negative_prompts_are_checked(model, guidance, negatives, settings, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        Expander(model, list(model.domains), guidance, ExpansionConfig(**SMALL, **settings, negative_prompts=negatives))


def test_exclusive_directions_of_the_own_text_in_other_capitals_are_zero(guidance):
    encoder = guidance.clip.encoders[0]
    rows = guidance.clip.exclusive_directions(encoder, "a person", "a zombie", ["A  ZOMBIE", "a sketch"])  # (2, D)
    assert torch.equal(rows[0], torch.zeros_like(rows[0]))  # rounding error is not blown up into a direction
    assert rows[1].norm().item() == pytest.approx(1.0)


def test_sds_composed_groups_drop_a_negative_that_names_the_partner(model, guidance):
    class Teacher:
        def __init__(self):
            self.calls = []

        def loss(self, domain_images, base_images, prompt, rng, negative_prompts=()):
            self.calls.append((prompt, list(negative_prompts)))
            return domain_images.mean() * 0

    guidance.teacher = Teacher()
    for domain in model.domains:
        domain.method = "sds"
    config = ExpansionConfig(**SMALL, compositions_per_step=2, negative_prompts={"zombie": ["A sketch", "a person with glasses"]})
    Expander(model, list(model.domains), guidance, config).step()
    zombie = [(prompt, negatives) for prompt, negatives in guidance.teacher.calls if (prompt if isinstance(prompt, str) else prompt[0]) == "a zombie"]
    assert ("a zombie", ["A sketch", "a person with glasses"]) in zombie  # alone: both negatives
    composed = [negatives for prompt, negatives in zombie if not isinstance(prompt, str)]
    assert composed and all(negatives == ["a person with glasses"] for negatives in composed)  # composed with the sketch: not "a sketch"


def test_negative_prompts_of_a_mystyle_domain_are_refused(tiny_generator, guidance):
    model = ExpandedGenerator.from_generator(tiny_generator, alpha=3.0, num_dormant=8)
    model.add_domain(Domain("me", direction=-1, method="mystyle", images="photos/me"))
    with pytest.raises(ValueError, match=re.escape("it is a mystyle domain; negative prompts steer text domains, nada or sds")):
        Expander(model, list(model.domains), guidance, ExpansionConfig(**SMALL, negative_prompts={"me": ["a person with glasses"]}))


def test_consistency_step_reuses_the_nada_embeddings(model, guidance):
    config = {**SMALL, "batch_size": 3}
    plain = Expander(model, list(model.domains), guidance, ExpansionConfig(**config)).losses()  # no step: the model is unchanged
    trainer = Expander(model, list(model.domains), guidance, ExpansionConfig(**config, lambda_nada_consistency=2.0))
    losses = trainer.losses()
    # the same latents, views and NADA loss (the RNG is drawn as without it), plus the consistency term
    assert losses["loss_nada"].item() == pytest.approx(plain["loss_nada"].item(), rel=1e-5)
    assert losses["loss_nada_consistency"].item() >= 0 and torch.isfinite(losses["loss_nada_consistency"])
    assert "loss_nada_consistency" in trainer.step()


def test_domain_weights_scale_only_that_domains_losses(model, guidance):
    config = {**SMALL, "batch_size": 3}

    def losses(**settings):  # no step: the model is unchanged, and weights draw nothing from the RNG
        return Expander(model, list(model.domains), guidance, ExpansionConfig(**config, **settings)).losses()

    zombie = losses(domain_weights={"sketch": {"lambda_nada": 0.0}})["loss_nada"].item()
    sketch = losses(domain_weights={"zombie": {"lambda_nada": 0.0}})["loss_nada"].item()
    assert losses()["loss_nada"].item() == pytest.approx(zombie + sketch, rel=1e-5)
    assert losses(domain_weights={"sketch": {"lambda_nada": 3.0}})["loss_nada"].item() == pytest.approx(zombie + 3 * sketch, rel=1e-5)
    # a term the run leaves off can be turned on for one domain, and the other way round
    assert "loss_nada_consistency" not in losses()
    one = losses(domain_weights={"zombie": {"lambda_nada_consistency": 2.0}})["loss_nada_consistency"].item()
    both = losses(lambda_nada_consistency=2.0)["loss_nada_consistency"].item()
    other = losses(lambda_nada_consistency=2.0, domain_weights={"zombie": {"lambda_nada_consistency": 0.0}})["loss_nada_consistency"].item()
    assert one > 0 and other > 0 and both == pytest.approx(one + other, rel=1e-5)


def test_domain_weights_for_a_domain_not_trained_are_refused(model, guidance):
    with pytest.raises(ValueError, match=r"domain_weights names \['hat'\], which this run does not train"):
        Expander(model, list(model.domains), guidance, ExpansionConfig(**SMALL, domain_weights={"hat": {"lambda_nada": 2.0}}))


def test_composition_both_ways_asks_for_both_edits_on_one_render(model, guidance):
    config = ExpansionConfig(**SMALL, compositions_per_step=2, composition_both_ways=True)
    trainer = Expander(model, list(model.domains), guidance, config)
    composed = [g for g in trainer._groups() if g.w_reference is not None]
    assert len(composed) == 4
    for first, second in zip(composed[::2], composed[1::2]):
        assert second.w_domain is first.w_domain and second.domain.name != first.domain.name
        # each side's reference is the composed latent minus its own edit: the other domain's subspace
        assert torch.allclose(first.reference, first.w_domain - trainer._offset(first.domain))
        assert torch.allclose(second.reference, second.w_domain - trainer._offset(second.domain))

    rendered = []
    synthesis = trainer.synthesis
    trainer.synthesis = lambda w: rendered.append(len(w)) or synthesis(w)
    trainer.step()
    # base + 2 trained domains + 2 composed latents (each rendered once) + 2 + 4 references, batch 2 each
    assert rendered == [2 * (1 + 2 + 2 + 2 + 4)]


def test_sds_composition_groups_ask_the_teacher_for_both_prompts(model, guidance):
    class Teacher:
        def __init__(self):
            self.prompts, self.negatives = [], []

        def loss(self, domain_images, base_images, prompt, rng, negative_prompts=()):
            self.prompts.append(prompt)
            self.negatives.append(list(negative_prompts))
            return domain_images.mean() * 0

    guidance.teacher = Teacher()
    for domain in model.domains:
        domain.method = "sds"
    trainer = Expander(model, list(model.domains), guidance, ExpansionConfig(**SMALL, compositions_per_step=2))
    trainer.step()
    # two plain groups with their own prompt, two composition groups with both prompts (own first)
    assert sorted(guidance.teacher.prompts[:2]) == ["a sketch", "a zombie"]
    assert guidance.teacher.negatives == [[]] * 4
    assert all(sorted(p) == ["a sketch", "a zombie"] and len(p) == 2 for p in guidance.teacher.prompts[2:]) and len(guidance.teacher.prompts) == 4
    # a domain's negative prompts reach the teacher with each of its groups, and only with its own
    guidance.teacher = Teacher()
    Expander(model, list(model.domains), guidance, ExpansionConfig(**SMALL, compositions_per_step=2, negative_prompts={"zombie": ["a person with glasses"]})).step()
    for prompt, negatives in zip(guidance.teacher.prompts, guidance.teacher.negatives):
        assert negatives == (["a person with glasses"] if (prompt if isinstance(prompt, str) else prompt[0]) == "a zombie" else [])


def test_composition_both_ways_skips_partners_without_guidance(model, guidance):
    model.add_domain(Domain("subject", direction=-1, method="mystyle"))
    config = ExpansionConfig(**SMALL, compositions_per_step=6, composition_both_ways=True)
    trainer = Expander(model, [model.get_domain("zombie")], guidance, config)
    composed = [g for g in trainer._groups() if g.w_reference is not None]
    assert all(g.domain.name in ("zombie", "sketch") for g in composed)
    assert len(composed) == 6 + sum(g.domain.name == "sketch" for g in composed)


def test_no_composition_without_a_partner_domain(tiny_generator, guidance):
    model = ExpandedGenerator.from_generator(tiny_generator, alpha=3.0, num_dormant=8)
    model.add_domain(Domain("zombie", direction=-1, prompt="a zombie"))
    trainer = Expander(model, list(model.domains), guidance, ExpansionConfig(**SMALL, compositions_per_step=2))
    assert [g.w_reference for g in trainer._groups()] == [None]


def test_replayed_domains_use_their_own_batch_size(model, guidance):
    trainer = Expander(model, [model.get_domain("zombie")], guidance, ExpansionConfig(**SMALL, replay_batch_size=5))
    sizes = {g.kind: len(g.w_domain) for g in trainer._groups()}
    assert sizes == {"replay": 5, "train": SMALL["batch_size"]}


def test_composed_edits_loss_renders_two_latents_per_pair_and_is_off_by_default(model, guidance):
    config = {**SMALL, "batch_size": 3}
    plain = Expander(model, list(model.domains), guidance, ExpansionConfig(**config))
    assert plain._composed_pairs([g for g in plain._groups()]) == [], "off by default: draws nothing from the RNG"
    trainer = Expander(model, list(model.domains), guidance, ExpansionConfig(**config, lambda_composed_edits=2.0, composed_pairs_per_step=3))
    pairs = trainer._composed_pairs(trainer._groups())
    assert len(pairs) == 3
    for group, partner, w_partner, w_composed in pairs:
        assert partner.name != group.domain.name
        # the same latents as the group's: base + the partner's edit, and the group's own edit on top
        assert torch.allclose(w_partner, group.w_base + trainer._offset(partner))
        assert torch.allclose(w_composed, group.w_domain + trainer._offset(partner))
    rendered = []
    synthesis = trainer.synthesis
    trainer.synthesis = lambda w: rendered.append(len(w)) or synthesis(w)
    losses = trainer.step()
    # base (batch 2) + 2 trained domains, their 2 references and 2 latents (partner, composed) per pair (batch 3)
    assert rendered == [2 + 3 * (2 + 2 + 2 * 3)]
    assert losses["loss_composed_edits"] > 0 and torch.isfinite(torch.tensor(losses["loss_composed_edits"]))


def test_composed_edits_need_clip_guidance(model):
    model.get_domain("zombie").method = "sds"  # an SDS-only run builds no CLIP
    teacher_only = Guidance(perceptual=pixel_distance, teacher=object())
    with pytest.raises(ValueError, match="lambda_composed_edits .* needs CLIP guidance"):
        Expander(model, [model.get_domain("zombie")], teacher_only, ExpansionConfig(**SMALL, lambda_composed_edits=1.0))


def test_lowpass_change_sees_regrading_more_than_a_small_object():
    from expander.losses import loss_lowpass_change

    base = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert loss_lowpass_change(base, base).item() == 0.0
    regraded = base + 0.2  # a background / skin-tone shift over the whole picture
    small_object = base.clone()
    small_object[:, :, 30:34, 20:28] = -1.0  # dark glasses-sized patch, 32 of 4096 pixels
    assert loss_lowpass_change(regraded, base).item() == pytest.approx(0.04, rel=1e-4)
    assert loss_lowpass_change(small_object, base).item() < 0.1 * loss_lowpass_change(regraded, base).item()
    # the same at another resolution: pooled to the same cells
    assert loss_lowpass_change(F.interpolate(regraded, 128), F.interpolate(base, 128)).item() == pytest.approx(0.04, rel=1e-3)


def test_edit_detail_sees_blotches_more_than_a_smooth_tint():
    from expander.losses import loss_edit_detail

    base = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert loss_edit_detail(base, base).item() == 0.0
    assert loss_edit_detail(base + 0.3, base).item() == pytest.approx(0.0, abs=1e-10)  # a uniform tint has no detail
    ramp = torch.linspace(-0.3, 0.3, 64).view(1, 1, 1, 64)
    tinted = base + ramp  # a tint that varies smoothly across the picture
    blotched = base + 0.3 * torch.sign(torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))).repeat_interleave(4, -1).repeat_interleave(4, -2).repeat(1, 1, 2, 2)  # 4-pixel blotches
    assert loss_edit_detail(tinted, base).item() < 0.01 * loss_edit_detail(blotched, base).item()
    assert loss_edit_detail(blotched, base).item() > 0.02
    # the same at another resolution: pooled to the same cells
    assert loss_edit_detail(F.interpolate(blotched, 128), F.interpolate(base, 128)).item() == pytest.approx(loss_edit_detail(blotched, base).item(), rel=0.05)


def test_smooth_edit_is_a_per_domain_term_of_nada_and_sds_domains(model, guidance):
    config = {**SMALL, "batch_size": 3}
    assert "loss_smooth_edit" not in Expander(model, list(model.domains), guidance, ExpansionConfig(**config)).losses()
    one = Expander(model, list(model.domains), guidance, ExpansionConfig(**config, domain_weights={"zombie": {"lambda_smooth_edit": 10.0}}))
    losses = one.losses()
    assert losses["loss_smooth_edit"].item() >= 0 and losses["loss_smooth_edit"].requires_grad
    assert "loss_smooth_edit" in one.step()
    with pytest.raises(ValueError, match=r"smooth_edit_size \(1000\) must be at most the images' resolution"):
        Expander(model, list(model.domains), guidance, ExpansionConfig(**config, smooth_edit_size=1000, lambda_smooth_edit=1.0))
    model.add_domain(Domain("subject", direction=-1, method="mystyle"))
    with pytest.raises(ValueError, match=r"lambda_smooth_edit of domains \['subject'\].*MyStyle"):
        Expander(model, list(model.domains), guidance, ExpansionConfig(**config, domain_weights={"subject": {"lambda_smooth_edit": 1.0}}))


def test_lowpass_keep_is_a_per_domain_term_of_nada_domains(model, guidance):
    config = {**SMALL, "batch_size": 3}
    assert "loss_lowpass_keep" not in Expander(model, list(model.domains), guidance, ExpansionConfig(**config)).losses()
    one = Expander(model, list(model.domains), guidance, ExpansionConfig(**config, domain_weights={"zombie": {"lambda_lowpass_keep": 10.0}}))
    losses = one.losses()
    assert losses["loss_lowpass_keep"].item() >= 0 and losses["loss_lowpass_keep"].requires_grad
    assert "loss_lowpass_keep" in one.step()
    model.add_domain(Domain("subject", direction=-1, method="mystyle"))
    with pytest.raises(ValueError, match=r"lambda_lowpass_keep of domains \['subject'\].*MyStyle"):
        Expander(model, [model.get_domain("subject")], guidance, ExpansionConfig(**SMALL, domain_weights={"subject": {"lambda_lowpass_keep": 1.0}}))
    with pytest.raises(ValueError, match=r"lowpass_size \(128\) must be at most the images' resolution \(16\)"):
        Expander(model, [model.get_domain("zombie")], guidance, ExpansionConfig(**SMALL, lambda_lowpass_keep=1.0, lowpass_size=128))


def test_image_exclusive_targets_restrict_the_hinge_to_the_named_domains(model, guidance):
    model.add_domain(Domain("pixel", direction=-1, prompt="pixel art"))
    config = {**SMALL, "batch_size": 3, "domain_weights": {"zombie": {"lambda_nada_image_exclusive": 1.0}}}

    def hinge(**settings):  # no step: the model is unchanged, and the targets draw nothing from the RNG
        return Expander(model, list(model.domains), guidance, ExpansionConfig(**config, **settings)).losses()["loss_nada_image_exclusive"].item()

    everyone = hinge()
    sketch, pixel = hinge(nada_image_exclusive_of={"zombie": ["sketch"]}), hinge(nada_image_exclusive_of={"zombie": ["pixel"]})
    assert sketch > 0 and pixel > 0
    assert sketch + pixel == pytest.approx(everyone, rel=1e-5)  # the hinge sums over its targets
    assert hinge(nada_image_exclusive_of={"zombie": ["sketch", "pixel"]}) == pytest.approx(everyone, rel=1e-6)


@pytest.mark.parametrize("targets, message", [
    ({"zombie": ["crown"]}, "names ['crown'], which this run does not train"),
    ({"sketch": ["zombie"]}, "whose lambda_nada_image_exclusive is 0"),
    ({"zombie": ["zombie"]}, "lists itself"),
    ({"zombie": []}, "non-empty list"),
    ({"zombie": "sketch"}, "non-empty list"),
    (["zombie"], "must map a domain name"),
])
def test_image_exclusive_targets_are_checked(model, guidance, targets, message):
    config = dict(SMALL, domain_weights={"zombie": {"lambda_nada_image_exclusive": 1.0}}, nada_image_exclusive_of=targets)
    with pytest.raises(ValueError, match=re.escape(message)):
        Expander(model, list(model.domains), guidance, ExpansionConfig(**config))


def test_a_non_finite_loss_stops_training_before_the_step(model, guidance, monkeypatch):
    import expander.train
    from expander.train import NonFiniteLossError

    def nan_replay(images, parent_images, perceptual):
        return images.mean() * float("nan"), images.mean() * 0

    monkeypatch.setattr(expander.train, "loss_replay", nan_replay)
    trainer = Expander(model, list(model.domains), guidance, ExpansionConfig(**SMALL), real_sampler=_real_renders)
    synthesis = [p.detach().clone() for p in model.generator.synthesis_parameters()]
    discriminator = {k: v.clone() for k, v in model.discriminator.state_dict().items()}
    with pytest.raises(NonFiniteLossError, match=r"training stopped at step 0: loss_replay_l2 = nan\. Nothing was updated"):
        trainer.step()
    assert all(torch.equal(a, b) for a, b in zip(synthesis, model.generator.synthesis_parameters()))
    assert all(torch.equal(v, discriminator[k]) for k, v in model.discriminator.state_dict().items())
    assert trainer.step_index == 0


def test_a_non_finite_discriminator_loss_stops_training_before_either_step(model, guidance, monkeypatch):
    import expander.train
    from expander.train import NonFiniteLossError

    monkeypatch.setattr(expander.train, "loss_d_logistic", lambda real, fake: real.mean() * float("inf"))
    trainer = Expander(model, list(model.domains), guidance, ExpansionConfig(**SMALL), real_sampler=_real_renders)
    synthesis = [p.detach().clone() for p in model.generator.synthesis_parameters()]
    discriminator = {k: v.clone() for k, v in model.discriminator.state_dict().items()}
    with pytest.raises(NonFiniteLossError, match="training stopped at step 0: the discriminator's loss = (nan|inf)"):
        trainer.step()
    assert all(torch.equal(a, b) for a, b in zip(synthesis, model.generator.synthesis_parameters()))
    assert all(torch.equal(v, discriminator[k]) for k, v in model.discriminator.state_dict().items())


def test_losses_take_no_discriminator_step(model, guidance):
    trainer = Expander(model, list(model.domains), guidance, ExpansionConfig(**SMALL), real_sampler=_real_renders)
    discriminator = {k: v.clone() for k, v in model.discriminator.state_dict().items()}
    assert "loss_gan" in trainer.losses()
    assert all(torch.equal(v, discriminator[k]) for k, v in model.discriminator.state_dict().items())
    assert all(not p.requires_grad for p in model.discriminator.parameters())  # frozen for the generator's GAN loss
    trainer.step()
    assert any(not torch.equal(v, discriminator[k]) for k, v in model.discriminator.state_dict().items())


def test_sds_prompts_the_teacher_cannot_take_are_refused_before_training(model, guidance):
    class Teacher:
        def check_prompt(self, prompt):
            if prompt != "a zombie":
                raise ValueError(f"the teacher knows no attribute in {prompt!r}")

        def loss(self, domain_images, base_images, prompt, rng, negative_prompts=()):
            return domain_images.mean() * 0

    guidance.teacher = Teacher()
    for domain in model.domains:
        domain.method = "sds"
    with pytest.raises(ValueError, match="SDS domain 'sketch': the teacher knows no attribute in 'a sketch'"):
        Expander(model, list(model.domains), guidance, ExpansionConfig(**SMALL))
    model.get_domain("sketch").method = "nada"  # a NADA partner's prompt reaches the teacher only in composition groups
    Expander(model, list(model.domains), guidance, ExpansionConfig(**SMALL))
    with pytest.raises(ValueError, match="domain 'sketch' is composed with SDS domains .*set compositions_per_step: 0"):
        Expander(model, list(model.domains), guidance, ExpansionConfig(**SMALL, compositions_per_step=1))
    with pytest.raises(ValueError, match="negative prompt 'a hat' of SDS domain 'zombie': the teacher knows no attribute in 'a hat'"):
        Expander(model, list(model.domains), guidance, ExpansionConfig(**SMALL, negative_prompts={"zombie": ["a hat"]}))


def test_a_seed_torch_would_wrap_is_refused():
    from expander.domains import MAX_SEED

    # torch's CPU generator reads the low 32 bits of a seed: 2**32 would silently train seed 0 again.
    assert torch.equal(torch.randn(4, generator=torch.Generator().manual_seed(2**32)), torch.randn(4, generator=torch.Generator().manual_seed(0)))
    ExpansionConfig(**SMALL, seed=MAX_SEED)
    with pytest.raises(ValueError, match=f"seed must be at most {MAX_SEED}"):
        ExpansionConfig(**SMALL, seed=2**32)
