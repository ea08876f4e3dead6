"""assets/ stays small: the shipped models (diffusion, verifier, CLIP, language models) must fit
under 100 MB together."""

from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "assets"
LIMIT_MB = 100.0


def test_assets_folder_is_under_100_mb():
    files = [p for p in ASSETS.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(ASSETS).parts)]
    sizes = {str(p.relative_to(ASSETS)): p.stat().st_size for p in files}
    assert len(sizes) >= 10, sorted(sizes)  # the models are there: nothing was skipped
    total = sum(sizes.values()) / 1e6
    biggest = sorted(sizes.items(), key=lambda kv: -kv[1])[:3]
    assert total < LIMIT_MB, f"assets/ holds {total:.1f} MB (limit {LIMIT_MB}); largest: {biggest}"
