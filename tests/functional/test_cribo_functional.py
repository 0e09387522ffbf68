import pytest
import torch

import ssl_modules.functional as F
from ssl_modules.functional import cribo as C


def _clustering_inputs(batch=2, side=3, dim=6, clusters=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    dense = [torch.randn(batch, side * side, dim, generator=gen, dtype=torch.float64) for _ in range(2)]
    grid = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(-1, 2)
    positions = [grid.double().expand(batch, -1, -1) * 10, grid.double().expand(batch, -1, -1) * 10 + 5]
    init = torch.stack([torch.randperm(2 * side * side, generator=gen)[:clusters] for _ in range(batch)])
    return dense, positions, init


def _loop_positional_cost(distances, labels, clusters):
    batch, tokens, _ = distances.shape
    cost = torch.zeros(batch, tokens, clusters, dtype=distances.dtype)
    for b in range(batch):
        for i in range(tokens):
            for k in range(clusters):
                d = [distances[b, i, j] for j in range(tokens) if labels[b, j] == k and distances[b, i, j] > 0]
                cost[b, i, k] = min(d) if d else 0.0
        mean = cost[b].mean()
        cost[b][cost[b] == 0] = mean
        cost[b] /= cost[b].max()
    return cost


def test_positional_cost_matches_a_loop_reference():
    torch.manual_seed(0)
    positions = torch.randint(0, 5, (2, 10, 2)).double()  # repeated positions: exact zeros
    distances = C._pairwise_distances(positions)
    labels = torch.randint(0, 4, (2, 10))  # label 3 = "no cluster" for K = 3
    torch.testing.assert_close(C._positional_cost(distances, labels, 3), _loop_positional_cost(distances, labels, 3))


def test_equal_positions_are_exactly_zero_apart():
    positions = torch.tensor([[[3.3, 7.1]] * 40], dtype=torch.float32)
    assert (C._pairwise_distances(positions) == 0).all()


def test_clustering_works_with_a_single_image():
    dense, positions, init = _clustering_inputs(batch=1)
    labels = F.joint_space_clustering(dense, positions, init)["labels"]
    assert labels.shape == (2, 1, 9) and labels.max() < 4


def test_grouped_normalisation_equals_clustering_each_group_alone():
    dense, positions, init = _clustering_inputs(batch=4, seed=3)
    grouped = F.joint_space_clustering(dense, positions, init, groups=2)["labels"]
    for g in range(2):
        part = slice(2 * g, 2 * g + 2)
        alone = F.joint_space_clustering([d[part] for d in dense], [p[part] for p in positions], init[part])["labels"]
        assert torch.equal(grouped[:, part], alone)


def test_too_many_clusters_are_rejected():
    dense, positions, _ = _clustering_inputs()
    with pytest.raises(ValueError, match="joint tokens"):
        F.joint_space_clustering(dense, positions, torch.arange(19).expand(2, 19))


def test_empty_clusters_give_zero_objects_and_are_invalid():
    dense = [torch.randn(1, 4, 3), torch.randn(1, 4, 3)]
    labels = torch.tensor([[[0, 0, 1, 1]], [[0, 2, 2, 2]]])
    out = F.object_representations(dense, labels, 4)
    assert out["valid"].tolist() == [[True, False, False, False]]
    assert (out["objects"][0, 0, 2] == 0).all() and (out["objects"][:, 0, 3] == 0).all()
    torch.testing.assert_close(out["objects"][1, 0, 2], dense[1][0, 1:].mean(0))


def test_padded_retrieval_equals_the_compact_contract():
    torch.manual_seed(0)
    objects, valid = torch.randn(2, 3, 4, 5), torch.rand(3, 4) > 0.4
    bank = torch.randn(2, 30, 5)
    compact = F.cycle_consistent_neighbours(objects[:, valid], bank[:, :20])
    padded = F.cycle_consistent_neighbours(objects.reshape(2, 12, 5), bank, query_valid=valid.reshape(-1),
                                           bank_valid=torch.arange(30) < 20, chunk_size=7)
    flat = valid.reshape(-1)
    assert torch.equal(padded["indices"][:, flat], compact["indices"])
    assert torch.equal(padded["mask"][:, flat], compact["mask"]) and not padded["mask"][:, ~flat].any()


def test_chunked_search_equals_one_matrix():
    torch.manual_seed(0)
    queries, bank = torch.randn(2, 6, 4), torch.randn(2, 50, 4)
    a = F.cycle_consistent_neighbours(queries, bank, chunk_size=7)
    b = F.cycle_consistent_neighbours(queries, bank)
    assert torch.equal(a["indices"], b["indices"]) and torch.equal(a["mask"], b["mask"])


def test_back_search_stays_inside_the_query_group():
    eye = torch.eye(6)
    view1 = torch.stack([eye[0], eye[1], eye[2], eye[3]])
    view2 = torch.stack([eye[4] + 0.5 * eye[5], -eye[5], eye[4], eye[5]])
    queries = torch.stack([view1, view2])
    # object 0 retrieves a stored object whose second view equals object 2's second view
    bank = torch.stack([view1[:1], view2[2:3]])
    ungrouped = F.cycle_consistent_neighbours(queries, bank)
    grouped = F.cycle_consistent_neighbours(queries, bank, query_groups=torch.tensor([0, 0, 1, 1]))
    assert not ungrouped["mask"][0, 0]  # lands on object 2
    assert grouped["mask"][0, 0]  # object 2 is another process's: the search lands on object 0 itself


def _loop_enqueue(bank, counts, objects, per_image):
    slots = counts.shape[0]
    b = min(per_image.shape[0], slots)
    n_new = int(per_image[:b].sum())
    n_keep = int(counts[: slots - b].sum())
    out = bank.clone()
    out[:, n_new : n_new + n_keep] = bank[:, :n_keep]
    out[:, :n_new] = objects[:, :n_new]
    return out, torch.cat([per_image[:b], counts[: slots - b]])


def test_padded_enqueue_equals_the_contract_on_compacted_objects():
    torch.manual_seed(0)
    bank, counts = torch.rand(2, 4 * 6, 3), torch.tensor([4, 2, 3, 1, 0, 4])
    objects, valid = torch.randn(2, 3, 4, 3), torch.rand(3, 4) > 0.5
    ref_bank, ref_counts = _loop_enqueue(bank, counts, objects[:, valid], valid.sum(1))
    contract = F.memory_bank_enqueue(bank, counts, objects[:, valid], valid.sum(1))
    padded = F.memory_bank_enqueue_padded(bank, counts, objects, valid)
    for out in (contract, padded):
        torch.testing.assert_close(out["bank"], ref_bank)
        assert torch.equal(out["counts"], ref_counts)


def test_enqueue_of_more_images_than_slots_keeps_the_first_ones():
    bank, counts = torch.zeros(2, 6, 2), torch.tensor([2, 2, 2])
    objects = torch.arange(2 * 8 * 2, dtype=torch.float32).reshape(2, 8, 2)
    out = F.memory_bank_enqueue(bank, counts, objects, torch.tensor([2, 2, 1, 3]))
    assert out["counts"].tolist() == [2, 2, 1]
    torch.testing.assert_close(out["bank"][:, :5], objects[:, :5])


def test_cross_image_loss_without_accepted_view1_objects_is_a_connected_zero():
    student = [torch.randn(3, 5, requires_grad=True) for _ in range(2)]
    neighbours = [torch.randn(3, 5) for _ in range(2)]
    mask = torch.tensor([[False] * 3, [True, False, True]])
    loss = F.cribo_cross_image_loss(student, neighbours, mask, torch.zeros(5), 0.04)
    assert loss.item() == 0 and loss.grad_fn is not None
    loss.backward()


def test_masked_object_loss_equals_the_loss_on_valid_rows():
    torch.manual_seed(0)
    student, teacher = [torch.randn(6, 8) for _ in range(2)], [torch.randn(6, 8) for _ in range(2)]
    valid = torch.tensor([True, False, True, True, False, True])
    center = torch.randn(8)
    padded = F.cribo_object_loss(student, teacher, center, 0.05, valid=valid)
    compact = F.cribo_object_loss([s[valid] for s in student], [t[valid] for t in teacher], center, 0.05)
    torch.testing.assert_close(padded, compact)
    nothing = F.cribo_object_loss([s.requires_grad_(True) for s in student], teacher, center, 0.05,
                                  valid=torch.zeros(6, dtype=torch.bool))
    assert nothing.item() == 0 and nothing.grad_fn is not None


def test_teacher_side_receives_no_gradient():
    teacher = [torch.randn(4, 6, requires_grad=True) for _ in range(2)]
    student = [torch.randn(4, 6, requires_grad=True) for _ in range(3)]
    center = torch.zeros(6, requires_grad=True)
    loss = F.cribo_global_loss(student, teacher, center, 0.04)
    grads = torch.autograd.grad(loss, [*teacher, center], allow_unused=True)
    assert all(g is None or (g == 0).all() for g in grads)
