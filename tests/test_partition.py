"""Partitions and the per-worker plans built from them, against naive twins."""
import numpy as np
import pytest

from fsd_runtime import model, partition
from fsd_runtime.plan import WorkerShare, build_shares
from fsd_runtime.storage import StorageError


@pytest.fixture(scope="module")
def small():
    ds = model.synthetic(256, 12, 200, seed=3)
    return ds, ds.network.pack()


def naive_volume(net, owners):
    """Rows sent per layer and pair, by walking every weight."""
    n_workers = int(owners.max()) + 1
    out = []
    for l in range(net.n_layers):
        pairs = np.zeros((n_workers, n_workers), np.int64)
        if l:
            colptr, rowidx, _, _ = net.layer_csc(l)
            sent = set()
            for j in range(net.n_neurons):
                for k in rowidx[colptr[j]:colptr[j + 1]]:
                    src, dst = owners[l - 1][k], owners[l][j]
                    if src != dst:
                        sent.add((int(k), int(src), int(dst)))
            for _, src, dst in sent:
                pairs[src, dst] += 1
        out.append(pairs)
    return out


@pytest.mark.parametrize("method", partition.METHODS)
@pytest.mark.parametrize("n_workers", [1, 3, 8])
def test_partition_is_balanced_and_volume_matches_naive_count(small, method, n_workers):
    _, net = small
    owners = partition.make_partition(net, n_workers, method)
    assert owners.shape == (net.n_layers, net.n_neurons)
    assert owners.min() == 0 and owners.max() == n_workers - 1
    report = partition.volume(net, owners)
    n = net.n_neurons
    allowed = max(partition.DEFAULT_IMBALANCE, -(-n // n_workers) / (n / n_workers) - 1)
    assert max(report["imbalance"]) <= allowed + 1e-9
    for l, pairs in enumerate(naive_volume(net, owners)):
        np.testing.assert_array_equal(np.asarray(report["rows"][l]), pairs)
        assert report["volume"][l] == pairs.sum()


def test_hypergraph_sends_far_less_than_contiguous_on_the_official_net(official_packed):
    net = official_packed
    hyper = partition.volume(net, partition.hypergraph(net, 8))
    contig = partition.volume(net, partition.contiguous(net.n_neurons, net.n_layers, 8))
    assert contig["volume"][1:20] == [7 * 1024] * 19      # contiguous: every row to every worker
    assert sum(hyper["volume"][:20]) < sum(contig["volume"][:20]) / 4
    assert max(hyper["imbalance"]) <= partition.DEFAULT_IMBALANCE + 1e-9


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, 257])
def test_bad_worker_counts_are_refused(small, bad):
    _, net = small
    with pytest.raises(ValueError):
        partition.make_partition(net, bad, "hypergraph")


def test_unknown_method_is_refused(small):
    with pytest.raises(ValueError, match="unknown partition method"):
        partition.make_partition(small[1], 2, "metis")


def test_shares_cover_every_output_and_plans_agree(small):
    ds, net = small
    owners = partition.hypergraph(net, 3)
    shares = build_shares(net, *ds.images.arrays, owners)
    for l in range(net.n_layers):
        outs = np.concatenate([s.out_neurons[l] for s in shares])
        np.testing.assert_array_equal(np.sort(outs), np.arange(net.n_neurons))
        for p, sp in enumerate(shares):
            # what p receives from q is exactly what q sends p, in the same neuron order
            for q, sq in enumerate(shares):
                if l and p != q:
                    got = sp.in_neurons[l][sp.recv_slots[l][q]]
                    sent = sq.out_neurons[l - 1][sq.send_pos[l][p]]
                    np.testing.assert_array_equal(got, sent)
            # W restricted to p's outputs, rows remapped to slots, is the original column
            colptr, rowidx, vals, _ = net.layer_csc(l)
            for i, j in enumerate(sp.out_neurons[l]):
                lo, hi = sp.colptr[l][i], sp.colptr[l][i + 1]
                np.testing.assert_array_equal(sp.in_neurons[l][sp.rowidx[l][lo:hi]],
                                              rowidx[colptr[j]:colptr[j + 1]])
                np.testing.assert_array_equal(sp.vals[l][lo:hi], vals[colptr[j]:colptr[j + 1]])


def test_share_round_trips_and_corruption_is_a_clear_error(small):
    ds, net = small
    share = build_shares(net, *ds.images.arrays, partition.contiguous(256, 12, 2))[1]
    back = WorkerShare.from_bytes(share.to_bytes())
    for name in ("out_neurons", "in_neurons", "colptr", "rowidx", "vals", "bias", "local_pos"):
        for a, b in zip(getattr(share, name), getattr(back, name)):
            np.testing.assert_array_equal(a, b)
    share.rowidx[3] = share.rowidx[3] + 10_000          # an index that would read out of bounds
    with pytest.raises(StorageError, match="rowidx"):
        WorkerShare.from_bytes(share.to_bytes())
    with pytest.raises(StorageError):
        WorkerShare.from_bytes(b"PK\x03\x04 not really a zip")


@pytest.mark.parametrize("name, peer_word", [("recv_slots", "from"), ("send_pos", "to")])
@pytest.mark.parametrize("value", [-1, 10_000])
def test_a_corrupt_per_peer_plan_is_refused_naming_layer_and_peer(small, name, peer_word, value):
    """The per-peer plans are checked all at once per layer (start-up cost); a bad entry is still
    refused before any kernel follows it, and the error names the layer and the peer."""
    ds, net = small
    share = build_shares(net, *ds.images.arrays, partition.contiguous(256, 12, 5))[2]
    layer = 4
    peer = max(p for p in range(5) if getattr(share, name)[layer][p].size)
    bad = getattr(share, name)[layer][peer].copy()
    bad[-1] = value
    getattr(share, name)[layer][peer] = bad
    with pytest.raises(StorageError, match=f"layer {layer} {name} {peer_word} {peer} has indices outside"):
        WorkerShare.from_bytes(share.to_bytes())
