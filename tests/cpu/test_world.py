"""The World API in the emulated CPU world, and init_world's checks that need no GPU."""

import pytest
import torch

import symm_mem
from symm_mem import EmulatedWorld


@pytest.mark.parametrize("R", [1, 2, 4])
def test_alloc_views_and_peer_base(R):
    with EmulatedWorld(R) as world:
        t = world.alloc((3, 5), torch.int32)
        assert (world.rank, world.world_size) == (0, R)
        assert t.shape == (3, 5) and t.dtype == torch.int32 and t.nbytes == 60
        assert len(t.views) == R and t.local is t.views[0]
        assert t.peer_base.dtype == torch.int64 and t.peer_base.shape == (R,)
        assert t.peer_base.tolist() == [v.data_ptr() for v in t.views]
        assert len(set(t.peer_base.tolist())) == R, "every rank needs its own copy"
        for v in t.views:
            assert v.shape == (3, 5) and bool((v == 0).all()), "alloc returns zeroed memory"


def test_close_frees_in_allocation_order():
    freed = []

    class SpyWorld(EmulatedWorld):
        def _free_views(self, views):
            freed.append(views[0].numel())

    world = SpyWorld(2)
    for n in (1, 2, 3):
        world.alloc((n,))
    world.free(world.allocations[1])
    world.alloc((4,))
    world.close()
    assert freed == [2, 1, 3, 4]
    world.close()  # closing twice is harmless
    assert freed == [2, 1, 3, 4]


def test_free_twice_raises():
    with EmulatedWorld(2) as world:
        t = world.alloc((4,))
        world.free(t)
        with pytest.raises(RuntimeError, match="already freed"):
            world.free(t)
        with pytest.raises(RuntimeError, match="was freed"):
            _ = t.local


def test_use_after_close_raises():
    world = EmulatedWorld(2)
    t = world.alloc((4,))
    world.close()
    for use in (
        lambda: world.alloc((4,)),
        lambda: world.free(t),
        lambda: t.local,
        lambda: world.run_ranks(lambda r: None),
    ):
        with pytest.raises(RuntimeError, match="(closed|freed)"):
            use()


def test_free_of_another_worlds_tensor_raises():
    with EmulatedWorld(2) as a, EmulatedWorld(2) as b:
        t = a.alloc((4,))
        with pytest.raises(ValueError, match="another world"):
            b.free(t)


@pytest.mark.parametrize("shape", [0, -1, (4, 0), (2, -3), (), (2.5,)])
def test_alloc_rejects_bad_shapes(shape):
    with EmulatedWorld(2) as world, pytest.raises(ValueError, match="(dimension|shape)"):
        world.alloc(shape)


@pytest.mark.parametrize("R", [0, -2, 1.5, True])
def test_emulated_world_rejects_bad_sizes(R):
    with pytest.raises(ValueError, match="world_size"):
        EmulatedWorld(R)


def test_emulated_world_rejects_bad_device_and_timeout():
    with pytest.raises(ValueError, match="cpu' or 'cuda"):
        EmulatedWorld(2, "meta")
    with pytest.raises(ValueError, match="timeout_s"):
        EmulatedWorld(2, timeout_s=0)


def _torchrun_env(monkeypatch, rank, size, local):
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(size))
    monkeypatch.setenv("LOCAL_RANK", str(local))


def test_init_world_outside_torchrun(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(RuntimeError, match="symm_mem.launch"):
        symm_mem.init_world()


def test_init_world_world_size_mismatch(monkeypatch):
    _torchrun_env(monkeypatch, 0, 2, 0)
    with pytest.raises(ValueError, match="world_size=4.*2 ranks"):
        symm_mem.init_world(world_size=4)


def test_init_world_without_gpu_says_so(monkeypatch):
    _torchrun_env(monkeypatch, 0, 1, 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs a GPU"):
        symm_mem.init_world()


def test_init_world_sets_nvshmem_env_first(monkeypatch):
    _torchrun_env(monkeypatch, 0, 1, 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("NVSHMEM_DISABLE_NVLS", "0")
    with pytest.warns(UserWarning, match="multicast stays off"), pytest.raises(RuntimeError):
        symm_mem.init_world(symmetric_size="2G")
    import os

    assert os.environ["NVSHMEM_DISABLE_NVLS"] == "1"
    assert os.environ["NCCL_NVLS_ENABLE"] == "0"
    assert os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1"
    assert os.environ["NVSHMEM_SYMMETRIC_SIZE"] == "2G"


def test_missing_nvshmem4py_is_a_clear_error(monkeypatch):
    import builtins

    from symm_mem import runtime

    real_import = builtins.__import__

    def no_nvshmem(name, *args, **kwargs):
        if name.startswith("nvshmem"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_nvshmem)
    with pytest.raises(RuntimeError, match="nvshmem4py-cu13==0.4.1"):
        runtime.import_nvshmem()


def test_version_checks():
    from types import SimpleNamespace

    from symm_mem import runtime

    def fake(py, lib):
        version = SimpleNamespace(nvshmem4py_version=py, libnvshmem_version=lib)
        return SimpleNamespace(core=SimpleNamespace(get_version=lambda: version))

    with pytest.raises(RuntimeError, match="nvshmem4py 0.3.0 is too old"):
        runtime.check_versions(fake("0.3.0", "3.4.5"))
    with pytest.raises(RuntimeError, match="libnvshmem 3.2.1 is too old"):
        runtime.check_versions(fake("0.4.1", "3.2.1"))
    assert runtime.version_tuple("3.4.5") == (3, 4, 5)
    assert runtime.version_tuple("0.4.1rc2") == (0, 4, 1)


def test_nvshmem_launch_refuses_uninitialised_module(monkeypatch):
    from symm_mem import runtime

    class FakeCompiled:
        module = 12345

        def _init_handles(self):
            pass

    class FakeKernel:
        __name__ = "fake_kernel"

        def warmup(self, *args, grid, **kwargs):
            return FakeCompiled()

        def __getitem__(self, grid):
            raise AssertionError("must not launch an uninitialised NVSHMEM kernel")

    monkeypatch.setattr(runtime, "device_bitcode", "/nonexistent/libnvshmem_device.bc")
    kernel = runtime.uses_nvshmem(FakeKernel())
    with pytest.raises(RuntimeError, match="fake_kernel.*not initialised"):
        runtime.launch(kernel, (1,))
    monkeypatch.setattr(runtime, "device_bitcode", None)
    with pytest.raises(RuntimeError, match="init_world"):
        runtime.launch(kernel, (1,))
