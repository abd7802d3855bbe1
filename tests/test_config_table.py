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
