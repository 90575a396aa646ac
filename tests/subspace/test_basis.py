import pytest
import torch

from expander.subspace.basis import LatentBasis, sefa
from expander.subspace.dormancy import dormancy_curve


def random_basis(dim: int = 16, repurposed=(13, 15)) -> LatentBasis:
    rng = torch.Generator().manual_seed(0)
    directions, singular_values = sefa([torch.randn(40, dim, generator=rng), torch.randn(7, dim, generator=rng)])
    basis = LatentBasis.from_sefa(directions, singular_values, torch.randn(dim, generator=rng))
    basis.set_repurposed(repurposed)
    return basis


def test_sefa_is_orthonormal_sorted_and_deterministic():
    weights = [torch.randn(30, 16), torch.randn(9, 16)]
    directions, singular_values = sefa(weights)
    torch.testing.assert_close(directions.t() @ directions, torch.eye(16), atol=1e-5, rtol=0)
    assert torch.all(singular_values[:-1] >= singular_values[1:])
    again, _ = sefa(weights)
    assert torch.equal(directions, again)
    # Columns are right singular vectors: |A v_k| equals the k-th singular value.
    stacked = torch.cat(weights)
    torch.testing.assert_close((stacked @ directions).norm(dim=0), singular_values, atol=1e-4, rtol=1e-4)


def test_sefa_pads_when_fewer_rows_than_dimensions():
    directions, singular_values = sefa([torch.randn(5, 12)])
    torch.testing.assert_close(directions.t() @ directions, torch.eye(12), atol=1e-5, rtol=0)
    assert torch.all(singular_values[5:] == 0)


@pytest.mark.parametrize("shape", [(8, 16), (8, 5, 16)])
def test_base_projection_is_idempotent_and_fixes_the_mean(shape):
    basis = random_basis()
    w = torch.randn(*shape)
    once = basis.project_base(w)
    torch.testing.assert_close(basis.project_base(once), once, atol=1e-5, rtol=0)
    torch.testing.assert_close(basis.project_base(basis.mean[None]), basis.mean[None], atol=1e-5, rtol=0)
    # Repurposed coordinates are pinned to the mean's, the others untouched.
    coords, mean_coords, w_coords = basis.coordinates(once), basis.coordinates(basis.mean), basis.coordinates(w)
    for k in range(16):
        if k in basis.repurposed:
            torch.testing.assert_close(coords[..., k], mean_coords[k].expand_as(coords[..., k]), atol=1e-5, rtol=0)
        else:
            torch.testing.assert_close(coords[..., k], w_coords[..., k], atol=1e-5, rtol=0)


def test_traversal_moves_only_the_chosen_coordinate():
    basis = random_basis()
    w = torch.randn(3, 16)
    amounts = torch.tensor([-2.0, 0.0, 1.0, 5.0])
    path = basis.traverse(w, 13, amounts)  # (3, 4, 16)
    delta = basis.coordinates(path) - basis.coordinates(basis.project_base(w)).unsqueeze(1)
    torch.testing.assert_close(delta[..., 13], amounts.expand(3, 4), atol=1e-4, rtol=0)
    others = torch.cat([delta[..., :13], delta[..., 14:]], dim=-1)
    assert others.abs().max() < 1e-4


def test_composition_adds_offsets():
    basis = random_basis()
    w = torch.randn(4, 16)
    both = basis.repurposed_latent(w, {13: 2.0, 15: 3.0})
    torch.testing.assert_close(both - basis.project_base(w), 2.0 * basis.directions[:, 13] + 3.0 * basis.directions[:, 15].expand(4, 16), atol=1e-5, rtol=0)


def test_bad_indices_are_refused():
    basis = random_basis()
    with pytest.raises(IndexError, match="out of range"):
        basis.offset({16: 1.0})
    with pytest.raises(ValueError, match="unique"):
        basis.set_repurposed([3, 3])


def test_dormancy_curve_is_deterministic_and_orders_directions(tiny_generator):
    from expander.checkpoint import ExpandedGenerator

    model = ExpandedGenerator.from_generator(tiny_generator)
    distance = lambda a, b: (a - b).abs().mean(dim=(1, 2, 3))  # noqa: E731 - a perceptual stand-in
    curve = dormancy_curve(model.generator, model.basis, distance, n_samples=4, progress=False)
    assert curve.shape == (32,) and torch.all(curve >= 0)
    assert torch.equal(curve, dormancy_curve(model.generator, model.basis, distance, n_samples=4, progress=False))
    model.basis.dormancy = curve
    order = model.basis.dormant_order()
    assert curve[order[0]] == curve.min() and sorted(order) == list(range(32))


def test_dormancy_curve_runs_a_perceptual_module_where_the_basis_is(tiny_generator):
    from expander.checkpoint import ExpandedGenerator

    class Distance(torch.nn.Module):  # a perceptual network, built on the CPU by load_perceptual
        moved_to: list = []

        def to(self, *args, **kwargs):  # this machine has one device: record where it is sent
            self.moved_to.append(torch.device(args[0]))
            return super().to(*args, **kwargs)

        def forward(self, a, b):
            return (a - b).abs().mean(dim=(1, 2, 3))

    model = ExpandedGenerator.from_generator(tiny_generator)
    distance = Distance()
    curve = dormancy_curve(model.generator, model.basis, distance, n_samples=2, progress=False)
    assert curve.shape == (32,) and distance.moved_to == [model.basis.mean.device]
