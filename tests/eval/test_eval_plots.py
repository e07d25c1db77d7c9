"""`rayq analyze` figures: every PNG written, stamped with its checkpoint, step and scheme, and its
axes name what they show (checked on the matplotlib artists, not on pixels)."""

from rayq.eval import analyze, plots, token_batches


def test_diagnostic_pngs_are_written_and_stamped(trained_gpt, tmp_path, monkeypatch):
    batches = token_batches(trained_gpt.sp.encode(trained_gpt.heldout["toy/heldout"]), 128,
                            trained_gpt.cfg.seq_len, 4)
    d = analyze(trained_gpt.model, batches)
    figures = []
    real_save = plots.save_png
    monkeypatch.setattr(plots, "save_png", lambda fig, path, **kw: figures.append(fig) or real_save(fig, path, **kw))
    paths = plots.plot_diagnostics(d, tmp_path, source="checkpoint RUN/checkpoints/step_40 · step 40")
    assert [p.rsplit("/", 1)[1] for p in paths] == list(plots.DIAGNOSTIC_PLOTS)
    for p in paths:
        assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*"))  # written atomically: no temporary file left
    for fig in figures:
        assert "step_40 · step 40" in fig._supxlabel.get_text()
        for ax in fig.axes:
            if ax.get_label() != "<colorbar>":
                assert ax.get_xlabel() and ax.get_ylabel()
    assert "vector-wise" in figures[1]._supxlabel.get_text()  # the scheme the RMSE panel measures


def test_place_labels_do_not_overlap():
    fig = plots.figure(4, 3)
    ax = fig.subplots()
    pts = [(1.0, 1.0), (1.0, 1.0), (1.001, 1.0), (2.0, 2.0)]
    ax.scatter(*zip(*pts))
    anns = plots.place_labels(ax, pts, ["#1 wd0.1", "#2 wd0.01", "#3 wd0.001", "#4"])
    r = fig.canvas.get_renderer()
    boxes = [a.get_window_extent(r) for a in anns]
    assert not any(boxes[i].overlaps(boxes[j]) for i in range(4) for j in range(i + 1, 4))
