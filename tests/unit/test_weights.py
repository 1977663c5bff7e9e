"""Weight sync pieces that need no Ray: bucket planning, flat buffers, and the collective
transport between threads of this process (its own gloo group on 127.0.0.1)."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from rlalign_ray.errors import WeightSyncError
from rlalign_ray.sync import transports as weights
from rlalign_ray.sync.buckets import (
    SyncPlan,
    empty_buffer,
    flatten_into,
    from_numpy,
    plan_buckets,
    to_numpy,
    unflatten,
)
from rlalign_ray.sync.transports import CollectiveTransport, SharedMemoryTransport, WeightHandle


def test_buckets_keep_order_and_size_and_a_large_parameter_travels_alone():
    layout = [("a", (10, 10)), ("b", (50,)), ("c", (300,)), ("d", (20,)), ("e", (30,))]
    # 4-byte elements, 200 elements per bucket: a+b=150 | c alone (300) | d+e=50
    buckets = plan_buckets(layout, torch.float32, 800)
    assert [b.names for b in buckets] == [("a", "b"), ("c",), ("d", "e")]
    assert buckets[0].offsets == (0, 100) and buckets[0].numel == 150
    assert buckets[2].shapes == ((20,), (30,))
    # bf16 halves the bytes: twice the elements (400) fit
    assert [b.names for b in plan_buckets(layout, torch.bfloat16, 800)] == [
        ("a", "b"),
        ("c", "d", "e"),
    ]
    assert len(plan_buckets(layout, torch.bfloat16, 1600)) == 1
    with pytest.raises(ValueError, match="no parameters"):
        plan_buckets([], torch.float32, 800)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flatten_casts_into_a_reused_buffer_and_unflatten_gives_views(dtype):
    src = {"w": torch.randn(3, 4), "b": torch.randn(4), "e": torch.randn(2, 2, 2)}
    (bucket,) = plan_buckets([(n, t.shape) for n, t in src.items()], dtype, 1 << 20)
    buf = empty_buffer(bucket.numel + 5, dtype)  # larger than the bucket, as when reused
    flat = flatten_into(buf, bucket, list(src.values()))
    assert flat.numel() == bucket.numel == 12 + 4 + 8 and flat.data_ptr() == buf.data_ptr()
    views = unflatten(flat, bucket)
    for (name, t), v in zip(src.items(), views):
        assert v.shape == t.shape and v.dtype == dtype
        assert torch.equal(v, t.to(dtype)), name  # the cast is exact to the target dtype
    assert views[1].data_ptr() == buf.data_ptr() + 12 * dtype.itemsize  # views, no copy
    # numpy has no bf16: it travels bit-cast as int16 and comes back bit for bit
    back = from_numpy(to_numpy(flat), dtype)
    assert back.dtype == dtype and torch.equal(back, flat)


class Sink:
    """The receiving end of a backend: copies what it is given, counts versions."""

    def __init__(self):
        self.weights: dict[str, torch.Tensor] = {}
        self.finished = 0

    def load_weights(self, weights):
        for name, t in weights:
            self.weights[name] = t.clone()

    def finish_weight_update(self):
        self.finished += 1

    def can_share(self, dtype):
        return False


class SharingSink(Sink):
    """A backend that takes the transport's tensors as its weights (the HF backend on CPU)."""

    def can_share(self, dtype):
        return True

    def share_weights(self, weights):
        self.weights = dict(weights)


def _group(plan: SyncPlan, n: int):
    sender = CollectiveTransport(plan)
    address = sender.open()
    receivers = [CollectiveTransport(plan) for _ in range(n)]
    threads = [
        threading.Thread(target=r.connect, args=(address, i + 1)) for i, r in enumerate(receivers)
    ]
    for t in threads:
        t.start()
    sender.connect(address, 0)
    for t in threads:
        t.join()
    return sender, receivers


@pytest.mark.parametrize("overlap", [False, True])
def test_collective_broadcasts_every_bucket_in_the_generators_dtype(overlap):
    params = {f"layer{i}.weight": torch.randn(16, 8 + i) for i in range(5)}
    layout = [(n, p.shape) for n, p in params.items()]
    buckets = plan_buckets(layout, torch.bfloat16, 600)  # several buckets
    plan = SyncPlan("collective", "gloo", "bfloat16", buckets, 30.0, world_size=3, overlap=overlap)
    assert len(buckets) > 2
    sender, receivers = _group(plan, 2)
    sinks = [Sink(), Sink()]
    for version in (1, 2):
        params = {n: p + 1 for n, p in params.items()}

        def receive(r, sink, version=version):
            for b in range(len(buckets)):
                r.receive(WeightHandle(version, b), sink)

        threads = [threading.Thread(target=receive, args=rs) for rs in zip(receivers, sinks)]
        for t in threads:
            t.start()
        for b, bucket in enumerate(buckets):
            sender.send(b, [params[n] for n in bucket.names])
        for t in threads:
            t.join()
        for fut in sender._sent.values():  # overlap: the broadcasts ran on the thread
            fut.result(timeout=30)
        for sink in sinks:
            assert sink.finished == version  # once per version, after the last bucket
            for name, p in params.items():
                assert torch.equal(sink.weights[name], p.to(torch.bfloat16)), name


def test_collective_receiver_without_a_sender_fails_within_the_timeout():
    (bucket,) = plan_buckets([("w", (4, 4))], torch.float32, 1 << 20)
    plan = SyncPlan("collective", "gloo", "float32", (bucket,), 2.0, world_size=2)
    _, (receiver,) = _group(plan, 1)
    with pytest.raises(
        WeightSyncError,
        match="collective weight sync: generator 0 could not "
        "receive bucket 0 of version 3 .sync.timeout_s=2s",
    ):
        receiver.receive(WeightHandle(3, 0), Sink())


def test_collective_group_with_a_missing_peer_fails_within_the_timeout():
    (bucket,) = plan_buckets([("w", (4, 4))], torch.float32, 1 << 20)
    plan = SyncPlan("collective", "gloo", "float32", (bucket,), 2.0, world_size=3)
    sender = CollectiveTransport(plan)
    address = sender.open()
    with pytest.raises(WeightSyncError, match="learner rank 0 could not join the gloo group"):
        sender.connect(address, 0)  # generators 0 and 1 never join


def test_shared_memory_moves_every_bucket_and_leaves_no_file():
    params = {f"layer{i}.weight": torch.randn(16, 8 + i) for i in range(5)}
    buckets = plan_buckets([(n, p.shape) for n, p in params.items()], torch.bfloat16, 600)
    plan = SyncPlan("shared_memory", "gloo", "bfloat16", buckets, 30.0, world_size=3)
    before = set(os.listdir(weights.SHM_DIR))
    sender = SharedMemoryTransport(plan)
    address = sender.open()
    assert set(os.listdir(weights.SHM_DIR)) == before  # unlinked at once, opened via /proc
    receivers = [SharedMemoryTransport(plan) for _ in range(2)]
    for i, r in enumerate(receivers):
        r.connect(address, i + 1)
    sender.seal()
    copying, sharing = Sink(), SharingSink()
    held = {}
    for version in (1, 2, 3):
        params = {n: p + 1 for n, p in params.items()}
        for b, bucket in enumerate(buckets):
            slot = sender.send(b, [params[n] for n in bucket.names])
            for r, sink in zip(receivers, (copying, sharing)):
                r.receive(WeightHandle(version, b, [slot]), sink)
        for sink in (copying, sharing):
            assert sink.finished == version
            for name, p in params.items():
                assert torch.equal(sink.weights[name], p.to(torch.bfloat16)), name
        held[version] = sharing.weights
    # the sharing receiver copied nothing: its weights are the segment's memory, and the
    # slot of version v - 1 is untouched while v is written (samplers may still use it)
    assert held[1]["layer0.weight"].data_ptr() == held[3]["layer0.weight"].data_ptr()
    assert held[2]["layer0.weight"].data_ptr() != held[3]["layer0.weight"].data_ptr()
    assert torch.equal(held[2]["layer0.weight"], (params["layer0.weight"] - 1).bfloat16())
    sender.close()


def test_shared_memory_refuses_a_segment_larger_than_dev_shm(monkeypatch):
    (bucket,) = plan_buckets([("w", (1024, 1024))], torch.float32, 1 << 30)
    plan = SyncPlan("shared_memory", "gloo", "float32", (bucket,), 30.0, world_size=2)
    monkeypatch.setattr(weights, "shm_free_bytes", lambda: 2**20)
    with pytest.raises(WeightSyncError, match="needs 0.01 GiB.*--shm-size.*object_store"):
        SharedMemoryTransport(plan).open()


def test_overlapped_send_returns_at_once_and_a_failed_broadcast_surfaces_on_the_next():
    """Pipelined training: the learner's publish does not wait for generators busy with a
    chunk; a broadcast nobody joined fails within the timeout, and the next publish says so
    (and closes the group, so a rejoin builds a new one)."""
    import time

    (bucket,) = plan_buckets([("w", (4, 4))], torch.float32, 1 << 20)
    plan = SyncPlan("collective", "gloo", "float32", (bucket,), 2.0, world_size=2, overlap=True)
    sender, _ = _group(plan, 1)
    start = time.monotonic()
    sender.send(0, [torch.ones(4, 4)])  # the receiver never receives
    assert time.monotonic() - start < 1.0
    with pytest.raises(WeightSyncError, match="could not broadcast an earlier bucket"):
        sender.send(0, [torch.ones(4, 4)])
    assert sender.group is None and sender._sender is None
    sender.close()  # twice is fine
