"""report.png is drawn with Pillow: a real PNG of the chart's size, bars where the values say."""

import io

from PIL import Image

from backdoor_cli.reports.bar_chart import HEIGHT, WIDTH, Bar, Series, bar_chart_png


def _chart(after_asr: float) -> Image.Image:
    png = bar_chart_png(
        "t",
        ["C-Acc", "ASR"],
        [
            Series("before", "#c0504d", [Bar(90.0, 89.0, 91.0), Bar(98.0, 97.0, 99.0)]),
            Series("after", "#4f81bd", [Bar(88.0, 87.0, 89.0), Bar(after_asr, max(after_asr - 1, 0), after_asr + 1)]),
        ],
    )
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    return Image.open(io.BytesIO(png)).convert("RGB")


def _blue_height(image: Image.Image, x_from: int, x_to: int) -> int:
    """Rows holding the 'after' colour in a column band: the drawn bar's height in pixels."""
    rows = set()
    for x in range(x_from, x_to):
        for y in range(image.height):
            if image.getpixel((x, y)) == (0x4F, 0x81, 0xBD):
                rows.add(y)
    return len(rows)


def test_chart_is_a_png_whose_bars_follow_the_values():
    low, high = _chart(2.0), _chart(60.0)
    assert low.size == (WIDTH, HEIGHT)
    right_half = (WIDTH // 2 + 40, WIDTH - 30)  # the ASR group's bars
    assert _blue_height(high, *right_half) > 10 * _blue_height(low, *right_half) > 0
    assert _blue_height(_chart(0.0), *right_half) == 0  # a 0% bar: nothing drawn, and no error


def test_purify_writes_report_png_without_matplotlib(tmp_path, monkeypatch):
    """The chart needs no optional extra: with matplotlib unimportable, purify still writes it."""
    import sys

    from typer.testing import CliRunner

    from backdoor_cli.cli import app
    from helpers import train_toy_model

    toy = {k: str(v) for k, v in train_toy_model(tmp_path / "toy", epochs=1).items()}
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    result = CliRunner().invoke(
        app,
        [
            "purify",
            toy["model"],
            "--data",
            toy["data"],
            "--method",
            "ft",
            "--epochs",
            "1",
            "--out",
            str(tmp_path / "out"),
            "--device",
            "cpu",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    image = Image.open(tmp_path / "out" / "report.png")
    assert image.format == "PNG" and image.size == (WIDTH, HEIGHT)
