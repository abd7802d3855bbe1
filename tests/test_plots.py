import io
from pathlib import Path

import matplotlib
import pandas as pd
import pytest
import torch

matplotlib.use("Agg")

from qqq import plots  # noqa: E402
from qqq.gptq import GPTQLoss  # noqa: E402
from qqq.smoothing import PointScale  # noqa: E402


@pytest.fixture(autouse=True)
def close_figures():
    yield
    matplotlib.pyplot.close("all")


def e2e_table():
    rows = []
    for model in ("llama-2-7b", "llama-3-8b"):
        for batch in (1, 8, 64):
            for i, method in enumerate(("qqq_g128", "fp16", "w8a8", "w4a16", "qqq")):  # not in plotting order
                speedup = 1.0 if method == "fp16" else 1 + 0.1 * i + 0.01 * batch + 0.5 * (model == "llama-3-8b")
                rows.append(dict(model=model, batch=batch, method=method, decode_tok_s=100 * speedup, ttft_ms=20.0,
                                 peak_mem_gb=3.0, speedup_vs_fp16=speedup, device="NVIDIA H100 80GB HBM3"))
    return pd.DataFrame(rows)


def test_e2e_bars_are_the_speedups_per_model_method_and_batch(tmp_path):
    df = e2e_table()
    path = tmp_path / "e2e_speed.png"
    fig = plots.plot_e2e_speedup(df, path)
    assert path.exists() and path.stat().st_size > 1000
    assert len(fig.axes) == 2
    for ax, model in zip(fig.axes, ("llama-2-7b", "llama-3-8b")):
        assert ax.get_title() == model
        assert [c.get_label() for c in ax.containers] == [m for m in plots.E2E_METHODS if m in set(df["method"])]
        for container in ax.containers:
            expected = df[(df["model"] == model) & (df["method"] == container.get_label())].sort_values("batch")
            assert [bar.get_height() for bar in container] == pytest.approx(list(expected["speedup_vs_fp16"]))


def test_a_figure_whose_save_is_interrupted_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "e2e_speed.png"
    path.write_bytes(b"the old figure")
    original = matplotlib.figure.Figure.savefig

    def stopped_halfway(self, target, **kwargs):  # half the png written, then the run is stopped
        data = io.BytesIO()
        original(self, data, **{**kwargs, "format": "png"})
        half = data.getvalue()[:len(data.getvalue()) // 2]
        if hasattr(target, "write"):
            target.write(half)
        else:
            Path(target).write_bytes(half)
        raise KeyboardInterrupt

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", stopped_halfway)
    with pytest.raises(KeyboardInterrupt):
        plots.plot_e2e_speedup(e2e_table(), path)
    assert [p.name for p in tmp_path.iterdir()] == ["e2e_speed.png"] and path.read_bytes() == b"the old figure"


def test_e2e_bars_of_renamed_methods_and_the_8_bit_kv_cache():
    old = e2e_table()  # measured before the rename and before kv_bits: the labels qqq and qqq_g128
    new = old.assign(method=old["method"].replace({"qqq": "w4a8_rtn", "qqq_g128": "w4a8_rtn_g128"}), kv_bits=16)
    kv8 = new[new["method"] == "w4a8_rtn"].assign(kv_bits=8, speedup_vs_fp16=lambda d: d["speedup_vs_fp16"] + 0.3)
    for df, labels in ((old, ["fp16", "w8a8", "w4a16", "qqq", "qqq_g128"]),
                       (pd.concat([new, kv8]), ["fp16", "w8a8", "w4a16", "w4a8_rtn", "w4a8_rtn kv8", "w4a8_rtn_g128"])):
        ax = plots.plot_e2e_speedup(df).axes[0]
        assert [c.get_label() for c in ax.containers] == labels
    heights = {c.get_label(): [bar.get_height() for bar in c] for c in ax.containers}
    assert heights["w4a8_rtn kv8"] == pytest.approx([h + 0.3 for h in heights["w4a8_rtn"]])


def test_e2e_missing_speedup_gets_no_bar_and_a_mark():
    df = e2e_table()
    df["status"] = "ok"
    out_of_memory = (df["model"] == "llama-2-7b") & (df["batch"] == 64)
    df.loc[out_of_memory, "speedup_vs_fp16"] = float("nan")  # FP16 ran out of memory: no speedup for anyone
    df.loc[out_of_memory & (df["method"] == "fp16"), "status"] = "out of memory"
    df = df[~((df["method"] == "w8a8") & (df["batch"] == 8))]  # not measured: a gap, no mark
    fig = plots.plot_e2e_speedup(df)
    ax = fig.axes[0]
    heights = {c.get_label(): [bar.get_height() for bar in c] for c in ax.containers}
    assert heights["w8a8"][1] == 0 and all(h[2] == 0 for h in heights.values())
    marks = sorted(t.get_text() for t in ax.texts)
    assert marks == ["n/a"] * 4 + ["out of memory"]
    assert len(fig.axes[1].texts) == 0


def test_e2e_table_without_the_speedup_column_is_rejected():
    with pytest.raises(ValueError, match="speedup_vs_fp16"):
        plots.plot_e2e_speedup(e2e_table().drop(columns="speedup_vs_fp16"))


def test_bandwidth_bound_is_the_byte_ratio():
    n, k = 8192, 21760
    fp16 = 2 * n * k + 2 * k + 2 * n
    w4a8 = n * k / 2 + 4 * n + 2 * k + 2 * n + 2 * k + 8
    assert plots.roofline_speedup("w4a8", 1, n, k) == pytest.approx(fp16 / w4a8)
    assert 3.9 < plots.roofline_speedup("w4a8", 1, n, k) < 4
    assert plots.roofline_speedup("w4a8_g128", 1, n, k) < plots.roofline_speedup("w4a8", 1, n, k)
    assert plots.roofline_speedup("w8a8", 1, n, k) == pytest.approx(2, rel=0.01)
    with pytest.raises(ValueError, match="no byte model"):
        plots.roofline_speedup("int3", 1, n, k)


def test_roofline_with_device_peaks_tends_to_the_tensor_core_ratio():
    device = "NVIDIA H100 80GB HBM3"
    assert plots.roofline_speedup("w4a8", 1, 8192, 8192, device) == pytest.approx(
        plots.roofline_speedup("w4a8", 1, 8192, 8192))  # memory bound at M = 1
    assert plots.roofline_speedup("w4a8", 8192, 8192, 8192, device) == pytest.approx(2.0, rel=1e-3)
    assert plots.roofline_speedup("w4a16", 8192, 8192, 8192, device) == pytest.approx(1.0, rel=1e-3)


def gemm_table():
    rows = []
    for shape, n, k in (("a", 256, 512), ("b", 512, 1024)):
        for m in (1, 16, 256):
            for kernel, speedup in (("fp16", 1.0), ("w4a8", 3.0 / (1 + m / 100)), ("w8a8", 1.5)):
                rows.append(dict(shape=shape, M=m, N=n, K=k, kernel=kernel, time_us=1.0, speedup_vs_fp16=speedup,
                                 device="some GPU"))
    return pd.DataFrame(rows)


def test_gemm_speedup_curves_and_roofline_lines(tmp_path):
    df = gemm_table()
    fig = plots.plot_gemm_speedup(df, tmp_path / "gemm.png", kernels=("w4a8", "w8a8"), title="t")
    assert (tmp_path / "gemm.png").exists()
    measured, roofline = fig.axes[1].get_lines()[:2]  # shape b, w4a8
    assert measured.get_label() == "w4a8" and roofline.get_linestyle() == "--"
    assert list(measured.get_ydata()) == pytest.approx([3.0 / 1.01, 3.0 / 1.16, 3.0 / 3.56])
    assert list(roofline.get_ydata()) == pytest.approx([plots.roofline_speedup("w4a8", m, 512, 1024)
                                                        for m in (1, 16, 256)])
    with pytest.raises(ValueError, match="not in the table"):
        plots.plot_gemm_speedup(df, shapes=["c"])


def test_results_csv_keeps_its_provenance(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("# command: python x.py\n# device: some GPU\nshape,M\na,1\n")
    df = plots.read_results_csv(path)
    assert df.attrs["provenance"] == {"command": "python x.py", "device": "some GPU"}
    assert list(df["M"]) == [1]


def test_the_committed_gemm_results_plot():
    df = plots.read_results_csv(Path(__file__).resolve().parents[1] / "results" / "gemm_speed.csv")
    assert df.attrs["provenance"]["device"] == df["device"].iloc[0]
    fig = plots.plot_gemm_speedup(df)
    assert len([ax for ax in fig.axes if ax.get_title()]) == df["shape"].nunique()


def point_scales(layers=3, channels=64):
    generator = torch.Generator().manual_seed(0)
    scales = []
    for layer in range(layers):
        maxima = torch.rand(channels, generator=generator) + 0.5
        maxima[3] = 40.0
        scale = (maxima / 2.0).clamp(min=1.0)
        scales.append({"qkv": PointScale(scale, 2.0, maxima), "down": PointScale(scale * 0 + 1, 50.0, maxima)})
    return scales


def test_activation_outliers_before_and_after(tmp_path):
    scales = point_scales()
    fig = plots.plot_activation_outliers(scales, 1, tmp_path / "outliers.png")
    assert (tmp_path / "outliers.png").exists()
    ratio_axis = fig.axes[2]  # bottom row, qkv
    before, after = ratio_axis.get_lines()[:2]
    expected_before = [float(s["qkv"].channel_max.max() / s["qkv"].channel_max.median()) for s in scales]
    assert list(before.get_ydata()) == pytest.approx(expected_before)
    assert all(a < b for a, b in zip(after.get_ydata(), before.get_ydata()))


def test_thresholds_and_gptq_losses(tmp_path):
    fig = plots.plot_smoothing_thresholds(point_scales(), tmp_path / "thresholds.png")
    assert list(fig.axes[0].get_lines()[1].get_ydata()) == [50.0] * 3
    losses = [{"self_attn.q_proj": GPTQLoss(1.0, 4.0), "mlp.down_proj": GPTQLoss(2.0, 3.0)} for _ in range(2)]
    fig = plots.plot_gptq_losses(losses, tmp_path / "gptq.png")
    assert [line.get_label() for line in fig.axes[1].get_lines()[:2]] == ["q_proj", "down_proj"]
    assert list(fig.axes[1].get_lines()[0].get_ydata()) == [0.25, 0.25]
    assert list(fig.axes[0].get_lines()[1].get_ydata()) == [3.0, 3.0]
    with pytest.raises(ValueError, match="SmoothQuant"):
        plots.plot_smoothing_thresholds([{"qkv": PointScale(torch.ones(4), None, torch.ones(4))}])


def test_weight_error_histograms_and_perplexities(tmp_path):
    weights = [torch.randn(32, 128, generator=torch.Generator().manual_seed(1))]
    fig = plots.plot_weight_errors(weights, (-1, 64), tmp_path / "errors.png")
    labels = [text.get_text() for text in fig.axes[0].get_legend().get_texts()]
    assert labels[0].startswith("per-channel") and labels[1].startswith("group 64")
    rms = [float(label.split("rms ")[1].rstrip(")")) for label in labels]
    assert rms[1] < rms[0] < 1 / 14
    fig = plots.plot_perplexities({"FP": 17.5, "QQQ": 21.2}, tmp_path / "ppl.png")
    assert [bar.get_width() for bar in fig.axes[0].containers[0]] == [17.5, 21.2]
    assert all((tmp_path / name).exists() for name in ("errors.png", "ppl.png"))
