"""One report content, three sinks: the items reach W&B, TensorBoard and the folder alike.

What each sink wrote is read back from disk: the offline W&B run's media files, history
records and summary, the TensorBoard event file (``EventAccumulator``), the folder's files
and ``index.md``; then compared with the items through each sink's naming rule.
"""

import inspect
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from _wandb import wandb_history, wandb_summary
from polca_lightning.report import analyze_store, kept_units, open_analysed_store, report_after_fit, store_coverage
from polca_lightning.report.content import COVERAGE_NOTE, report_items, send_report
from polca_lightning.report.folder import FolderSink, folder_file
from polca_lightning.report.tensorboard_report import TensorBoardSink, tensorboard_tags
from polca_lightning.report.wandb_report import WandbSink, wandb_keys
from test_report import copy_store, finished_store, tiny_fit

pytest.importorskip("tensorboard")


@pytest.fixture(scope="module")
def analysed_store(tmp_path_factory) -> Path:
    """The tiny finished run, analysed with ``min_samples=3``: clusters on vectors 0 and 3,
    none on the kept vector 1; ablation results from the callback."""
    store = copy_store(finished_store(tmp_path_factory), tmp_path_factory.mktemp("sinks"))
    analyze_store(store, min_samples=3)
    return store


@pytest.fixture(scope="module")
def analysed(analysed_store):
    return open_analysed_store(analysed_store)


def clustered_units(ds):
    return [u for u in kept_units(ds) if (ds["cluster_size"].sel(basis=u).values > 0).any()]


def event_tags(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"images": 0, "tensors": 0, "scalars": 0})
    acc.Reload()
    return acc


def test_every_sink_gets_every_item_under_its_naming_rule(analysed, tmp_path):
    import wandb
    from lightning.pytorch.loggers import WandbLogger
    from torch.utils.tensorboard import SummaryWriter

    ds = analysed
    logger = WandbLogger(save_dir=tmp_path, offline=True, project="polca-test")
    run_dir = Path(logger.experiment.dir).parent
    writer = SummaryWriter(str(tmp_path / "tb"))
    items = []  # what passed, for the comparison below (figures are closed by then)

    def recorded(stream):
        for item in stream:
            items.append((item.name, item.kind, None if item.kind == "figure" else item.value))
            yield item

    step = int(ds["step"].values[-1])
    sinks = [WandbSink(logger, step), TensorBoardSink(writer, step, csv_dir=tmp_path / "tb_csv"),
             FolderSink(tmp_path / "folder")]
    wandb_sent, tb_sent, folder = send_report(recorded(report_items(ds)), sinks)
    writer.close()
    wandb.finish()

    # the content itself, against the store: figures for the clustered vectors only
    names = {name for name, _, _ in items}
    assert len(names) == len(items)
    clustered, kept = clustered_units(ds), kept_units(ds)
    assert clustered == [0, 3] and 1 in kept
    for u in range(4):
        want = {f"vector_{u:02d}/{n}" for n in ("projected_loss", "exact_loss", "labels", "targets", "ablation")}
        assert (want <= names) if u in clustered else not any(n.startswith(f"vector_{u:02d}/") for n in names)
    assert {"summary", "medoid_contexts", "cluster_targets", "ablation", "ablation_summary", "appendix_g",
            "appendix_g_carry", "appendix_g_place", "signal_check", "coverage", "coverage_plot",
            "coverage_total/ratio", "kept_vectors", "hidden_breakthroughs", "tau", "tau_paper", "overview",
            "mean_loss"} <= names
    (overview,) = [value for name, _, value in items if name == "overview"]
    assert COVERAGE_NOTE in overview and "Kept vectors without clusters (no per-vector figures): 1." in overview
    scalars = {name: value for name, kind, value in items if kind == "scalar"}
    assert scalars["kept_vectors"] == len(kept)
    assert scalars["coverage_total/ratio"] == pytest.approx(store_coverage(ds)["summary"]["ratio"])

    class Item:  # the naming rules take items; figures need no value
        def __init__(self, name, kind, value):
            self.name, self.kind, self.value = name, kind, value

    content = [Item(*t) for t in items]

    # W&B: images and tables in the media folder, numbers in the history, text in the summary
    kind_of = {"figure": "image", "table": "table", "scalar": "number", "series": "number", "text": "summary"}
    expected = {(kind_of[i.kind], key) for i in content for key in wandb_keys(i)}
    media = run_dir / "files" / "media"
    got = {("image", str(p.relative_to(media / "images")).rsplit("_", 2)[0]) for p in media.rglob("*.png")}
    got |= {("table", str(p.relative_to(media / "table")).rsplit("_", 2)[0]) for p in media.rglob("*.table.json")}
    media_keys = {key for _, key in got}  # their fields (width, path, ...) are flattened into the records

    def own(key):
        return key.startswith("polca_report/") and key.rsplit("/", 1)[0] not in media_keys

    got |= {("number", k) for row in wandb_history(run_dir) for k, v in row.items()
            if own(k) and isinstance(v, (int, float))}
    summary = wandb_summary(run_dir)
    got |= {("summary", k) for k, v in summary.items() if own(k) and isinstance(v, str)}
    assert got == expected
    assert set(wandb_sent) == {key for _, key in expected}
    assert summary["polca_report/overview"] == overview

    # TensorBoard: images, texts (tensors of the text plugin) and scalars of the event file
    acc = event_tags(tmp_path / "tb")
    expected = {pair for i in content for pair in tensorboard_tags(i)}
    got = {(kind, tag) for kind in ("images", "tensors", "scalars") for tag in acc.Tags()[kind]}
    assert got == expected and set(tb_sent) == {tag for _, tag in expected}
    cov = store_coverage(ds)
    assert [e.step for e in acc.Scalars("polca_report/coverage/real")] == cov["step"].tolist()
    np.testing.assert_allclose([e.value for e in acc.Scalars("polca_report/coverage/real")], cov["real"], rtol=1e-6)
    (text,) = acc.Tensors("polca_report/overview/text_summary")
    assert text.tensor_proto.string_val[0].decode() == overview
    csvs = {p.name for p in (tmp_path / "tb_csv").iterdir()}
    assert csvs == {folder_file(i) for i in content if i.kind in ("table", "series")}

    # the folder: one file per figure, table and series; scalars and the text in index.md
    assert folder == tmp_path / "folder"
    index = (folder / "index.md").read_text()
    files = {p.name for p in folder.iterdir()} - {"index.md"}
    assert files == {folder_file(i) for i in content if folder_file(i) is not None}
    assert "coverage.png" in files and "coverage_plot.png" not in files  # the name of earlier reports
    assert "mean_loss.png" in files
    listed = {line.split("`")[1] for line in index.split("## Scalars")[1].split("##")[0].splitlines()
              if line.startswith("- `")}
    assert listed == {i.name for i in content if i.kind == "scalar"}
    assert overview in index and COVERAGE_NOTE in index
    assert {line.split("](")[0][3:] for line in index.split("## Files")[1].splitlines() if line.startswith("- [")} \
        == files


def test_figures_are_drawn_and_closed_one_at_a_time(analysed):
    items = report_items(analysed)
    assert inspect.isgenerator(items)  # nothing is drawn before it is asked for

    class Watch:
        def __init__(self):
            self.figures = []

        def send(self, item):
            if item.kind == "figure":
                assert item.value.axes, item.name  # drawn
                assert all(not f.axes for f in self.figures), "an earlier figure is still open"
                self.figures.append(item.value)

        def finish(self):
            return self.figures

    (figures,) = send_report(items, [Watch()])
    assert len(figures) > 10 and all(not f.axes for f in figures)


def test_without_a_logger_the_report_folder_is_written_and_its_place_said(analysed_store, tmp_path, caplog):
    store = copy_store(analysed_store, tmp_path)
    with caplog.at_level(logging.INFO, logger="polca_lightning"):
        with pytest.warns(UserWarning, match="no W&B or TensorBoard logger; the report is in .*polca.zarr.report"):
            out = report_after_fit(store, loggers=[], analysis_kwargs={"min_samples": 3}, progress=False)
    assert out == store.with_name("polca.zarr.report") and (out / "index.md").exists()
    assert f"POLCA: report written to {out}" in caplog.text
    assert {"vector_00_projected_loss.png", "vector_03_ablation.png"} <= {p.name for p in out.iterdir()}


def test_fit_with_lightnings_default_tensorboard_logger_gets_the_report(tmp_path):
    cb = tiny_fit(tmp_path, logger=True, analysis_kwargs={"min_samples": 3})  # Lightning's default logger
    log_dir = tmp_path / "lightning_logs" / "version_0"  # a TensorBoardLogger's, as tensorboard is installed
    assert list(log_dir.glob("events.out.tfevents.*"))
    assert not (tmp_path / "polca.zarr.report").exists()  # TensorBoard got the report, not a folder
    acc = event_tags(log_dir)
    images, texts, scalars = (set(acc.Tags()[k]) for k in ("images", "tensors", "scalars"))
    assert {"polca_report/vector_00/projected_loss", "polca_report/vector_03/labels", "polca_report/coverage_plot",
            "polca_report/appendix_g_carry"} <= images
    assert not any(t.startswith("polca_report/vector_01/") for t in images)  # kept, no clusters
    assert {"polca_report/summary/text_summary", "polca_report/medoid_contexts/text_summary",
            "polca_report/ablation/text_summary", "polca_report/overview/text_summary"} <= texts
    assert {"polca_report/coverage_total/ratio", "polca_report/coverage/ratio", "polca_report/kept_vectors"} <= scalars
    (kept,) = acc.Scalars("polca_report/kept_vectors")
    assert kept.value == len(kept_units(open_analysed_store(cb.store))) and kept.step == 12
    summary = (log_dir / "polca_report" / "summary.csv").read_text().splitlines()
    assert summary[0].startswith("vector,eigenvalue,basis_step,kept") and len(summary) == 1 + 4


def test_moved_ablation_names_still_import_with_a_warning():
    from polca_lightning.analysis import ablation as numbers
    from polca_lightning.report import figures

    import polca_lightning.ablation as ablation

    for name, home in (("ablation_table", numbers), ("ablation_summary", numbers), ("ablated_units", numbers),
                       ("ablation_figure", figures)):
        with pytest.warns(DeprecationWarning, match=f"{name} moved to {home.__name__}"):
            assert getattr(ablation, name) is getattr(home, name)
    with pytest.raises(AttributeError, match="no_such_name"):
        ablation.no_such_name  # noqa: B018
    # the torch part does not pull in the report
    code = ("import sys, polca_lightning.ablation; "
            "print(sorted(m for m in sys.modules if m.startswith('polca_lightning.report')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
