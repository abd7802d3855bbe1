"""Which tuned configs a GPU uses: its own file, a same-chip GPU's (with a warning), else the heuristic."""

import json
import warnings

import pytest

from qqq.kernels_triton import config_table
from qqq.kernels_triton.gpu import GpuInfo

H100 = GpuInfo("NVIDIA H100 80GB HBM3", "9.0", 132, 227 * 1024, 50 * 2**20)
H200 = GpuInfo("NVIDIA H200", "9.0", 132, 227 * 1024, 60 * 2**20)
OTHER = GpuInfo("NVIDIA A100-SXM4-80GB", "8.0", 108, 163 * 1024, 40 * 2**20)
KEY = config_table.config_key("w4a8", 4096, 4096, -1, 16)
OTHER_KEY = config_table.config_key("w4a8", 4096, 4096, -1, 64)


def tuned(block_n: int, split_k: int = 1) -> dict:
    return dict(BLOCK_N=block_n, BLOCK_M=16, BLOCK_K=256, SPLIT_K=split_k, GROUP_N=8, num_warps=4, num_stages=4)


def write(folder, gpu: GpuInfo, configs: dict) -> None:
    (folder / f"{gpu.file_name}.json").write_text(json.dumps(
        {"device": gpu.name, "compute_capability": gpu.compute_capability, "sm_count": gpu.sm_count,
         "configs": configs}))


@pytest.fixture
def on_gpu(monkeypatch, tmp_path):
    """Pretend to run on ``gpu`` with the config files of ``tmp_path``."""
    def use(gpu: GpuInfo):
        monkeypatch.setattr(config_table, "CONFIG_DIR", tmp_path)
        monkeypatch.setattr(config_table, "current_gpu", lambda: gpu)
        monkeypatch.setattr(config_table, "_CACHE", {})
        monkeypatch.setattr(config_table, "_PICKED", {})
        monkeypatch.setattr(config_table, "_WARNED", set())
    return use


def test_a_gpu_without_its_file_uses_a_same_chip_gpus_file_and_says_so_once(on_gpu, tmp_path):
    write(tmp_path, H100, {KEY: tuned(128, 4)})
    on_gpu(H200)
    with pytest.warns(UserWarning, match=r"no tuned kernel configs for NVIDIA H200; using those of NVIDIA_H100.*qqq tune"):
        assert config_table.get_config("w4a8", 1, 4096, 4096, -1) == tuned(128, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config_table.get_config("w4a8", 2, 4096, 4096, -1)


def test_its_own_entries_come_first_and_the_same_chip_file_fills_the_rest(on_gpu, tmp_path):
    write(tmp_path, H100, {KEY: tuned(128, 4), OTHER_KEY: tuned(32)})
    write(tmp_path, H200, {KEY: tuned(64, 2)})
    on_gpu(H200)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # it has a file of its own: nothing to warn about
        assert config_table.get_config("w4a8", 1, 4096, 4096, -1) == tuned(64, 2)
        assert config_table.get_config("w4a8", 64, 4096, 4096, -1) == tuned(32)
    assert config_table.config_sources() == [tmp_path / f"{H200.file_name}.json", tmp_path / f"{H100.file_name}.json"]


def test_another_chip_gets_the_heuristic_with_a_warning(on_gpu, tmp_path):
    write(tmp_path, H100, {KEY: tuned(128, 4)})
    on_gpu(OTHER)
    with pytest.warns(UserWarning, match=r"no tuned kernel configs for NVIDIA A100.*heuristic.*qqq tune"):
        config = config_table.get_config("w4a8", 1, 4096, 4096, -1)
    assert config == config_table.heuristic_config("w4a8", 1, 4096, 4096, -1)


def test_the_shipped_files_name_their_chip():
    for path in config_table.CONFIG_DIR.glob("*.json"):
        data = json.loads(path.read_text())
        assert data["compute_capability"] and data["sm_count"] > 0 and data["configs"], path


def test_split_k_and_pipelining_follow_the_gpu(monkeypatch):
    monkeypatch.setattr(config_table, "current_gpu", lambda: H100)
    h100_split = config_table._auto_split_k(tiles=16, k_tiles=64)
    monkeypatch.setattr(config_table, "current_gpu", lambda: OTHER)
    assert config_table._auto_split_k(tiles=16, k_tiles=64) <= h100_split
    deep = dict(BLOCK_N=128, BLOCK_M=64, BLOCK_K=256, num_warps=8, num_stages=5)  # 5 stages of 32 KB tiles
    assert not config_table._fits("w4a8", deep)  # over what an A100-class block may use
    monkeypatch.setattr(config_table, "current_gpu", lambda: H100)
    assert config_table._fits("w4a8", deep)


def _key(cfg: dict) -> tuple:
    return tuple(cfg[key] for key in config_table.CONFIG_KEYS)


def test_a_quick_tune_times_the_configs_shipped_for_the_problem_and_its_neighbouring_buckets(on_gpu, tmp_path):
    on_gpu(H200)
    at_16 = config_table.candidate_configs("w4a8", 16, 4096, 4096, -1)
    at_32 = [cfg for cfg in config_table.candidate_configs("w4a8", 32, 4096, 4096, -1) if cfg["BLOCK_M"] == 32]
    far = config_table.candidate_configs("w4a8", 128, 4096, 4096, -1)[-1]  # bucket 128: not a neighbour of 16
    stale = dict(at_16[0], num_stages=5)  # no longer a candidate
    key = lambda bucket: config_table.config_key("w4a8", 4096, 4096, -1, bucket)  # noqa: E731
    write(tmp_path, H100, {key(16): at_16[3], key(32): at_32[-1], key(128): far, key(2): stale})
    write(tmp_path, H200, {key(16): at_16[5]})
    quick = config_table.shipped_candidates("w4a8", 16, 4096, 4096, -1)
    # bucket 32's config comes in the BLOCK_M that bucket 16 takes (16)
    assert {_key(cfg) for cfg in quick} == {_key(at_16[3]), _key(at_16[5]), _key(dict(at_32[-1], BLOCK_M=16))}
    assert all(cfg in at_16 for cfg in quick)
    assert config_table.shipped_candidates("w4a8", 16, 4096, 11008, -1) == []  # no file has this problem


def test_the_quick_tuner_falls_back_to_every_candidate_where_nothing_is_shipped(on_gpu, tmp_path, monkeypatch):
    import torch

    from qqq.kernels_triton import autotune

    on_gpu(H200)
    monkeypatch.setattr(autotune, "current_gpu", lambda: H200)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    shipped = config_table.candidate_configs("w4a8", 16, 4096, 4096, -1)[2]
    write(tmp_path, H100, {config_table.config_key("w4a8", 4096, 4096, -1, 16): shipped})
    compiled, timed = [], {}
    monkeypatch.setattr(autotune, "precompile", lambda jobs: compiled.extend(jobs))

    def fake_tune_problem(kernel, m, n, k, group_size, candidates, **_):
        timed[(n, k, m)] = candidates
        return candidates[0], 1.0
    monkeypatch.setattr(autotune, "tune_problem", fake_tune_problem)
    tuned = autotune.tune([(4096, 4096, -1), (4096, 11008, -1)], [16], verbose=False, shipped_only=True)
    assert [_key(cfg) for cfg in timed[(4096, 4096, 16)]] == [_key(shipped)]
    assert timed[(4096, 11008, 16)] == config_table.candidate_configs("w4a8", 16, 4096, 11008, -1)
    # each config is compiled once (the kernels do not specialize on N or K): the union of what is timed
    every_timed = {_key(cfg) for configs in timed.values() for cfg in configs}
    assert sorted(_key(job.config) for job in compiled) == sorted(every_timed)
    assert json.loads((tmp_path / f"{H200.file_name}.json").read_text())["configs"].keys() == tuned.keys()


def test_the_fused_gluon_kernel_splits_k_where_its_tiles_leave_sms_idle(monkeypatch):
    monkeypatch.setattr(config_table, "current_gpu", lambda: H100)
    monkeypatch.setattr(config_table, "tma_available", lambda: True)

    def splits(kernel, n, k, group_size, bucket=64):
        return {(cfg["BLOCK_N"], cfg["BLOCK_M"], cfg["SPLIT_K"])
                for cfg in config_table.candidate_configs(kernel, bucket, n, k, group_size)
                if cfg["WS"] and cfg["SPLIT_K"] > 1}

    # Llama-2-7B o at 64 tokens: 32 tiles of 128 x 64 for 132 SMs -> 4 parts (128 units) and 8 (256)
    assert {(128, 64, 4), (128, 64, 8)} <= splits("w4a8_group", 4096, 4096, 128)
    assert all(split in (2, 4, 8) for *_, split in splits("w4a8", 4096, 4096, -1))
    assert splits("w4a8", 22016, 4096, -1) == set()  # 172 tiles already fill the SMs
    assert splits("w4a8", 4096, 256, -1) == set()  # at most 4 K steps: no two parts of 4 steps or more
    # every split candidate is a valid config, on the path of the fused Gluon kernel with work units
    from qqq.kernels_triton.w4a8_gemm import launch_path
    config = dict(BLOCK_N=128, BLOCK_M=64, BLOCK_K=128, SPLIT_K=4, GROUP_N=8, num_warps=4, num_stages=4, WS=2)
    config_table.check_config("w4a8_group", config, 64, 4096, 4096, 128)
    assert launch_path(config, 128) == "fused_ws_split_k"
    for not_fused in (dict(config, DEQUANT=1), dict(config, WS=0, TMA=1)):  # the int8 GEMMs have no split-K
        with pytest.raises(ValueError, match="without split-K"):
            config_table.check_config("w4a8_group", not_fused, 64, 4096, 4096, 128)
    with pytest.raises(ValueError, match="without split-K"):
        config_table.check_config("w8a8", dict(config, SPLIT_K=2), 64, 4096, 4096, -1)


def test_a_quick_tune_adds_every_candidate_of_a_newer_path(on_gpu, tmp_path, monkeypatch):
    import torch

    from qqq.kernels_triton import autotune
    from qqq.kernels_triton.w4a8_gemm import launch_path

    on_gpu(H200)
    monkeypatch.setattr(config_table, "tma_available", lambda: True)
    monkeypatch.setattr(autotune, "current_gpu", lambda: H200)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    every = config_table.candidate_configs("w4a8_group", 64, 4096, 4096, 128)
    shipped = next(cfg for cfg in every if launch_path(cfg, 128) == "fused")
    write(tmp_path, H200, {config_table.config_key("w4a8_group", 4096, 4096, 128, 64): shipped})
    timed = []
    monkeypatch.setattr(autotune, "precompile", lambda jobs: None)

    def fake_tune_problem(kernel, m, n, k, group_size, candidates, **_):
        timed.extend(candidates)
        return candidates[0], 1.0
    monkeypatch.setattr(autotune, "tune_problem", fake_tune_problem)
    autotune.tune([(4096, 4096, 128)], [64], verbose=False, shipped_only=True, new_paths=("fused_ws_split_k",))
    quick = config_table.shipped_candidates("w4a8_group", 64, 4096, 4096, 128)  # the shipped tile, any BLOCK_M
    split = [cfg for cfg in every if launch_path(cfg, 128) == "fused_ws_split_k"]
    assert _key(shipped) in map(_key, quick) and split
    assert [_key(cfg) for cfg in timed] == [_key(cfg) for cfg in quick + split]
    with pytest.raises(ValueError, match="no W4A8 launch path named"):
        autotune.tune([(4096, 4096, 128)], [64], shipped_only=True, new_paths=("fused_split",))
