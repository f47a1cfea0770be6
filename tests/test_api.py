"""The top level a newcomer uses: `import fmtoy` names the whole workflow, and the README's example runs."""

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import torch  # noqa: E402

import fmtoy  # noqa: E402

README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_public_name_resolves_and_plotting_loads_lazily():
    missing = [name for name in fmtoy.__all__ if not hasattr(fmtoy, name)]
    assert not missing
    assert set(fmtoy.__all__) <= set(dir(fmtoy))
    from fmtoy import viz

    assert fmtoy.plot_samples is viz.plot_samples
    try:
        _ = fmtoy.no_such_name
    except AttributeError as e:
        assert "no attribute 'no_such_name'" in str(e)
    else:
        raise AssertionError("fmtoy.no_such_name should raise AttributeError")


def test_the_readme_example_runs_with_fmtoy_alone(capsys):
    block = re.search(r"## Using fmtoy outside the book\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    assert block.startswith("import fmtoy\n") and "from fmtoy" not in block
    namespace: dict = {}
    torch.manual_seed(0)  # the example draws its noise from torch's global generator
    exec(compile(block.replace("steps=3000", "steps=150"), "README.md", "exec"), namespace)
    learned, exact = (float(v) for v in capsys.readouterr().out.split())
    assert exact < 0.02 and learned < 0.5, (exact, learned)  # the exact field samples the target; a short run nears it
