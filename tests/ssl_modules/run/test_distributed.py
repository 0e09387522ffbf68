import torch

from support.distributed_utils import run_distributed
from ssl_modules.run import distributed


def _gather_values_and_grads(rank: int, world_size: int):
    x = torch.arange(6, dtype=torch.float64).reshape(3, 2).add(10 * rank).requires_grad_(True)
    gathered = distributed.all_gather_with_grad(x)
    # a loss that weighs every gathered row differently, and differently on every rank
    weights = torch.arange(1, gathered.numel() + 1, dtype=torch.float64).reshape_as(gathered) * (rank + 1)
    (gathered * weights).sum().backward()
    variable = distributed.all_gather_variable(torch.full((rank + 1, 2), float(rank)))
    reduced_max = distributed.all_reduce(torch.tensor([float(rank)]), "max")
    reduced_sum = distributed.all_reduce(torch.tensor([float(rank + 1)]), "sum")
    return gathered.detach(), x.grad, variable, reduced_max, reduced_sum


def test_all_gather_values_and_summed_gradients_on_two_processes():
    results = run_distributed(_gather_values_and_grads, world_size=2)
    rows = [torch.arange(6, dtype=torch.float64).reshape(3, 2) + 10 * r for r in range(2)]
    weights = torch.arange(1, 13, dtype=torch.float64).reshape(6, 2)
    for rank, (gathered, grad, variable, rmax, rsum) in enumerate(results):
        torch.testing.assert_close(gathered, torch.cat(rows))
        # d/dx_r of sum_q sum(gathered * weights * (q + 1)) = weights[rows of r] * (1 + 2)
        torch.testing.assert_close(grad, weights[3 * rank : 3 * rank + 3] * 3)
        torch.testing.assert_close(variable, torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]))
        assert rmax.item() == 1.0 and rsum.item() == 3.0


def test_collectives_are_no_ops_without_a_process_group():
    x = torch.randn(4, 3, requires_grad=True)
    assert distributed.all_gather_with_grad(x) is x
    torch.testing.assert_close(distributed.all_gather_variable(x), x.detach())
    torch.testing.assert_close(distributed.all_reduce(x, "max"), x.detach())
    assert distributed.world_size() == 1 and distributed.rank() == 0
