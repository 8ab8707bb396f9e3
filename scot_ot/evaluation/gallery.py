"""The failure gallery of an evaluation: pictures of the pairs worth looking at, and a page that shows them.

Two selections of pairs from an evaluation record (:func:`select_pairs`), both on
the per-pair PCK at :math:`\\alpha = 0.10`, :math:`\\mathrm{PCK}_s(p)` for solver
``s`` and pair ``p``:

- **worst**: the ``size`` pairs of lowest :math:`\\mathrm{PCK}_{s_0}(p)`, where
  :math:`s_0` is the first solver of the run, ascending;
- **differ**: for two compared solvers ``a`` and ``b``, the ``size`` pairs of largest
  gap :math:`|\\mathrm{PCK}_a(p) - \\mathrm{PCK}_b(p)| > 0`, descending (pairs where
  the two agree are not differences and are left out).

Ties keep the record's pair order (the sorts are stable). A pair where a solver
that ranks it failed (``{"failed": reason}``) is left out of that selection.

:func:`write_gallery` draws one picture per selected pair and solver, three panels
made by :mod:`scot_ot.plotting`: the trusted matches with the keypoints (source,
transferred, ground truth), the target in-degree :math:`d_j`, and the foreground
sources matched into the target background. ``index.html`` shows them in tables
with the pair's numbers from the record. The page is one self-contained file
(inline style, no script, relative links only) that a browser opens offline;
every string on it is HTML-escaped, and file names keep only ``[A-Za-z0-9._-]``.
"""

from __future__ import annotations

import html
import math
import re
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

#: the folder under the gallery's folder that holds the pictures
PICTURES = "pictures"
#: the record key of PCK@0.10, which both selections rank by
PCK_KEY = "0.1"
_NAME_LIMIT = 80


# ------------------------------------------------------------------ arguments
def check_size(size) -> int:
    """``size`` if it is an int >= 1; ValueError naming ``--gallery-size`` if not."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"--gallery-size: must be an integer >= 1, got {size!r}")
    return size


def check_compare(record: dict, compare) -> Optional[Tuple[str, str]]:
    """``compare`` as a pair of two different solver specs of ``record`` (or None); ValueError naming
    ``--gallery-compare`` if not."""
    if compare is None:
        return None
    solvers = list(record["config"]["solvers"])
    if isinstance(compare, str) or len(compare) != 2:
        raise ValueError(f"--gallery-compare: give two solver specs, got {compare!r}")
    a, b = compare
    for spec in (a, b):
        if spec not in solvers:
            raise ValueError(f"--gallery-compare: {spec!r} is not a solver of this run; "
                             f"the solvers are {', '.join(solvers)}")
    if a == b:
        raise ValueError(f"--gallery-compare: give two different solvers, got {a!r} twice")
    return a, b


def _check_pck_key(record: dict) -> None:
    keys = [f"{float(a):g}" for a in record["config"]["alphas"]]
    if PCK_KEY not in keys:
        raise ValueError(f"--gallery: the gallery ranks pairs by PCK@0.10, which this run did not "
                         f"measure (alphas {', '.join(keys)})")


# ------------------------------------------------------------------ selection
def _finite(v) -> Optional[float]:
    """``v`` as a float if it is a finite number, else None (absent, None, NaN)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def pck010(pair_record: dict, spec: str) -> Optional[float]:
    """PCK@0.10 of solver ``spec`` on one pair of the record; None where it failed or is missing."""
    res = pair_record["results"].get(spec)
    if not isinstance(res, dict) or "failed" in res:
        return None
    return _finite((res.get("pck") or {}).get(PCK_KEY))


def select_pairs(record: dict, size: int, compare: Optional[Tuple[str, str]] = None) -> Dict[str, List[str]]:
    """The pair ids of the two selections (see the module docstring).

    Returns ``{"worst": [...], "differ": [...]}``, each at most ``size`` long:
    ``worst`` ascending in PCK@0.10 of ``record['config']['solvers'][0]``, ``differ``
    descending in ``|PCK@0.10(compare[0]) - PCK@0.10(compare[1])|`` (``[]`` when
    ``compare`` is None). Pairs whose ranking solver(s) failed are left out.
    """
    size = check_size(size)
    compare = check_compare(record, compare)
    _check_pck_key(record)
    first = record["config"]["solvers"][0]
    scored = [(p["pair_id"], pck010(p, first)) for p in record["pairs"]]
    worst = sorted([(pid, v) for pid, v in scored if v is not None], key=lambda t: t[1])
    differ: List[Tuple[str, float]] = []
    if compare is not None:
        for p in record["pairs"]:
            va, vb = pck010(p, compare[0]), pck010(p, compare[1])
            if va is not None and vb is not None and va != vb:
                differ.append((p["pair_id"], abs(va - vb)))
        differ.sort(key=lambda t: -t[1])
    return {"worst": [pid for pid, _ in worst[:size]], "differ": [pid for pid, _ in differ[:size]]}


# ------------------------------------------------------------------ file names
def safe_name(text: str) -> str:
    """``text`` with every character outside ``[A-Za-z0-9._-]`` replaced by ``_``, at most 80 long,
    never starting with a dot (no hidden files, no ``..``)."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", str(text))[:_NAME_LIMIT]
    return "_" + name[1:] if name.startswith(".") else (name or "_")


def unique_name(stem: str, suffix: str, used: set) -> str:
    """``stem + suffix``, or ``stem-2 + suffix``, ``stem-3 + suffix``, ... : the first not in ``used``
    (compared without case, for case-insensitive file systems); added to ``used``."""
    name, k = stem + suffix, 1
    while name.lower() in used:
        k += 1
        name = f"{stem}-{k}{suffix}"
    used.add(name.lower())
    return name


# ------------------------------------------------------------------ pictures
def _mathtext_safe(text: str) -> str:
    return str(text).replace("$", r"\$")


def draw_pair(corr, src_img, trg_img, pair, pred, foreground, title: str):
    """One figure, three panels: matches with keypoints, target in-degree, background matches.

    ``src_img``, ``trg_img``: the resized (3, H', W') images in [0, 1]; ``pred``: the
    transferred (K, 2) keypoints in original target pixels; ``foreground``: a
    :class:`scot_ot.diagnostics.Foreground`. Returns the figure (not saved).
    """
    from ..plotting import draw_background_matches, draw_in_degree, draw_matches, pyplot

    plt = pyplot()
    hs, ws = src_img.shape[-2:]
    ht, wt = trg_img.shape[-2:]
    wide = ws + wt  # width of a side-by-side panel, in image pixels
    total = 2 * wide + wt
    width = 13.0  # inches, about 1400 px at the figures' 110 dpi
    fig = plt.figure(figsize=(width, width * max(hs, ht) / total + 0.6))
    grid = fig.add_gridspec(1, 3, width_ratios=[wide, wt, wide], wspace=0.16)
    ax_m, ax_d, ax_b = (fig.add_subplot(grid[0, k]) for k in range(3))
    draw_matches(ax_m, corr, src_img, trg_img, src_kps=pair.src_kps, pred_kps=pred, gt_kps=pair.trg_kps,
                 title="matches and keypoints")
    im = draw_in_degree(ax_d, corr, trg_img)
    bar = fig.colorbar(im, cax=ax_d.inset_axes([1.02, 0.0, 0.05, 1.0]))  # as tall as the image
    bar.ax.tick_params(labelsize=7)
    draw_background_matches(ax_b, corr, src_img, trg_img, foreground)
    fig.suptitle(_mathtext_safe(title), fontsize=9)
    return fig


# ------------------------------------------------------------------ the page
def _format(scale: float, spec: str, unit: str = ""):
    """A cell formatter: ``scale * v`` with ``spec`` and ``unit``, or a dash for a missing or non-finite ``v``."""
    def fmt(v) -> str:
        v = _finite(v)
        return "–" if v is None else f"{scale * v:{spec}}{unit}"
    return fmt


_pct, _ratio, _ms, _count = _format(100, ".1f", "%"), _format(1, ".3f"), _format(1000, ".1f", " ms"), _format(1, ".0f")


#: (record key, column heading, format) of the per-solver measures on the page
MEASURES = (
    ("collision_rate", "collision", _pct),
    ("effective_target_ratio", "eff/N", _ratio),
    ("mutual_nn_rate", "mutual NN", _pct),
    ("background_rate", "background", _pct),
    ("unmatched_mass", "unmatched mass", _pct),
    ("ot_time_s", "OT time", _ms),
    ("n_iters", "iterations", _count),
)

_STYLE = """
body { font-family: sans-serif; font-size: 14px; margin: 1em 2em; color: #222; }
table { border-collapse: collapse; margin-bottom: 2em; }
th, td { border: 1px solid #bbb; padding: 3px 6px; text-align: right; vertical-align: top; }
th { background: #eee; }
td.text { text-align: left; }
td.failed { color: #a00; text-align: left; }
tr.first td { border-top: 2px solid #444; }
img { width: 720px; height: auto; }
code { background: #f4f4f4; }
"""


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _describe(d) -> str:
    if not isinstance(d, dict):
        return _e(d)
    return ", ".join(f"{_e(k)}: {_e(v)}" for k, v in d.items())


class _Page:
    """The tables of ``index.html``; strings go through :func:`html.escape` where they are placed."""

    def __init__(self, record: dict, solvers: List[str], alphas: List[str], show_unmatched: bool):
        self.record, self.solvers, self.alphas = record, solvers, alphas
        self.measures = [m for m in MEASURES if show_unmatched or m[0] != "unmatched_mass"]

    def header(self) -> List[str]:
        cells = ["#", "pair", "solver"] + [f"PCK@{float(a):.2f}" for a in self.alphas] + [m[1] for m in self.measures]
        return ["<tr>" + "".join(f"<th>{_e(c)}</th>" for c in cells) + "<th>picture</th></tr>"]

    def pair_rows(self, rank: int, pair_record: dict, note: str, pictures: Dict[str, str],
                  problems: Dict[str, str]) -> List[str]:
        rows = []
        n = len(self.solvers)
        for k, spec in enumerate(self.solvers):
            cells = []
            if k == 0:
                label = f"{_e(pair_record['pair_id'])}<br>{_e(pair_record.get('category', ''))}"
                if note:
                    label += f"<br><small>{_e(note)}</small>"
                cells += [f'<td rowspan="{n}">{rank}</td>', f'<td class="text" rowspan="{n}">{label}</td>']
            cells.append(f'<td class="text"><code>{_e(spec)}</code></td>')
            res = pair_record["results"].get(spec)
            span = len(self.alphas) + len(self.measures)
            if not isinstance(res, dict):
                cells.append(f'<td class="failed" colspan="{span}">no result in the record</td>')
            elif "failed" in res:
                cells.append(f'<td class="failed" colspan="{span}">failed: {_e(res["failed"])}</td>')
            else:
                pck = res.get("pck") or {}
                cells += [f"<td>{_e(_pct(pck.get(a)))}</td>" for a in self.alphas]
                cells += [f"<td>{_e(fmt(res.get(key)))}</td>" for key, _, fmt in self.measures]
            if spec in pictures:
                src = _e(f"{PICTURES}/{pictures[spec]}")
                alt = _e(f"{pair_record['pair_id']}, {spec}")
                cells.append(f'<td><a href="{src}"><img src="{src}" alt="{alt}" loading="lazy"></a></td>')
            else:
                cells.append(f'<td class="failed">{_e(problems.get(spec, "no picture"))}</td>')
            rows.append(f'<tr class="{"first" if k == 0 else "rest"}">' + "".join(cells) + "</tr>")
        return rows


def _render(record: dict, selection: Dict[str, List[str]], compare, pictures: Dict[str, Dict[str, str]],
            problems: Dict[str, Dict[str, str]], notes: Dict[str, str], drawn_foregrounds: Sequence[str]) -> str:
    solvers = list(record["config"]["solvers"])
    alphas = [f"{float(a):g}" for a in record["config"]["alphas"]]
    by_id = {p["pair_id"]: p for p in record["pairs"]}
    shown = [by_id[pid] for ids in selection.values() for pid in ids]
    show_unmatched = any(_finite((p["results"].get(s) or {}).get("unmatched_mass")) is not None
                         for p in shown for s in solvers if isinstance(p["results"].get(s), dict))
    page = _Page(record, solvers, alphas, show_unmatched)
    fg = record.get("foreground")
    lines = [
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        "<title>scot_ot failure gallery</title>", f"<style>{_STYLE}</style>", "</head>", "<body>",
        "<h1>Failure gallery</h1>",
        f"<p>{len(record['pairs'])} evaluated pairs; solvers: "
        + ", ".join(f"<code>{_e(s)}</code>" for s in solvers) + ". "
        + f"Foreground of the run's background rate: {_describe(fg) if fg is not None else 'not recorded'}; "
        + f"of the pictures: {_e(', '.join(drawn_foregrounds) or 'none drawn')}.</p>",
        "<p>Each picture: (left) the most confident mutual matches of foreground sources, with the "
        "source keypoints, the transferred keypoints (yellow) and the ground truth (green crosses; white "
        "lines are the errors); (middle) the target in-degree, how many sources each target hyperpixel "
        "receives; (right) the foreground (blue) and the foreground sources matched into the target "
        "background (red) or foreground (green). Rates are per pair; eff/N is the effective number of "
        "distinct targets over N; \u2013: not measured.</p>",
    ]
    sections = [("worst", f"The {len(selection['worst'])} worst pairs by PCK@0.10 of "
                          f"<code>{_e(solvers[0])}</code>")]
    if compare is not None:
        sections.append(("differ", f"The {len(selection['differ'])} pairs where <code>{_e(compare[0])}</code> "
                                   f"and <code>{_e(compare[1])}</code> differ most in PCK@0.10"))
    for key, heading in sections:
        lines.append(f"<h2>{heading}</h2>")
        if not selection[key]:
            lines.append("<p>No pair to show.</p>")
            continue
        lines += ["<table>"] + page.header()
        for rank, pid in enumerate(selection[key], 1):
            p = by_id[pid]
            note = notes.get(pid, "")
            if key == "differ":
                gap = abs(pck010(p, compare[0]) - pck010(p, compare[1]))
                note = f"gap {100 * gap:.1f} points" + (f"; {note}" if note else "")
            lines += page.pair_rows(rank, p, note, pictures.get(pid, {}), problems.get(pid, {}))
        lines.append("</table>")
    lines += ["</body>", "</html>", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------ the gallery
def write_gallery(model, pairs: Sequence, record: dict, out_dir, size: int = 8,
                  compare: Optional[Tuple[str, str]] = None,
                  foreground: Optional[Callable] = None, features: Optional[Callable] = None,
                  progress: bool = True) -> Path:
    """Write the pictures (under ``out_dir/pictures/``) and ``out_dir/index.html``; returns the page's path.

    ``model``: the :class:`scot_ot.SCOT` of the run; ``pairs``: the run's dataset
    pairs (found by ``pair_id``; a selected pair not among them is listed without
    pictures); ``record``: the run's JSON record. Every solver of the record is drawn
    on every selected pair, except where it failed in the record; a solver that
    fails when re-run here is noted on the page. ``size``, ``compare``: as in
    :func:`select_pairs`. ``foreground``: ``(pair, hs, ht) -> Foreground or None``
    for the background panel; None (or a None answer) uses the keypoint box
    (:func:`scot_ot.diagnostics.keypoint_foreground`). ``features``: ``image path ->
    Hyperpixels`` as the run computed them (e.g. the ``get`` of the run's
    :class:`~scot_ot.evaluation.run.FeatureCache`, whose marginals may come from masks);
    None: ``model.hyperpixels``. Files are written atomically;
    pictures of earlier galleries in ``out_dir`` are left alone.
    """
    from tqdm.auto import tqdm

    from ..diagnostics import keypoint_foreground
    from ..outputs import atomic_write, check_output_dir
    from ..plotting import pyplot, save_figure
    from .run import check_result, parse_solver_spec

    pyplot()  # the plot extra, checked before any work
    size = check_size(size)
    compare = check_compare(record, compare)
    out_dir = check_output_dir(out_dir, "--gallery")
    selection = select_pairs(record, size, compare)
    solvers = list(record["config"]["solvers"])
    models = {}
    for spec in solvers:
        name, overrides = parse_solver_spec(spec)
        models[spec] = model.with_solver(name, **overrides)

    by_id = {p["pair_id"]: p for p in record["pairs"]}
    dataset = {p.pair_id: p for p in pairs}
    order = list(dict.fromkeys(selection["worst"] + selection["differ"]))  # each pair drawn once
    todo = {pid: [s for s in solvers if isinstance(by_id[pid]["results"].get(s), dict)
                  and "failed" not in by_id[pid]["results"][s]] for pid in order}
    notes = {pid: "not among the loaded pairs: no pictures" for pid in order if pid not in dataset}
    pictures: Dict[str, Dict[str, str]] = {pid: {} for pid in order}
    problems: Dict[str, Dict[str, str]] = {pid: {} for pid in order}
    used: set = set()
    methods: List[str] = []  # foreground methods of the drawn pictures
    out_dir.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=sum(len(todo[pid]) for pid in order if pid in dataset), desc="gallery",
               unit="picture", disable=not progress)
    try:
        for pid in order:
            if pid not in dataset:
                continue
            pair = dataset[pid]
            if features is None:
                hs, ht = model.hyperpixels(pair.src_path, "src"), model.hyperpixels(pair.trg_path, "trg")
            else:
                hs, ht = features(pair.src_path), features(pair.trg_path)
            src_img = model.prepare(pair.src_path, "src")[0].cpu()
            trg_img = model.prepare(pair.trg_path, "trg")[0].cpu()
            fg = foreground(pair, hs, ht) if foreground is not None else None
            if fg is None:
                fg = keypoint_foreground(hs, ht, pair.src_kps, pair.trg_kps)
            if fg.method not in methods:
                methods.append(fg.method)
            for spec in todo[pid]:
                try:
                    corr = models[spec].match_hyperpixels(hs, ht)
                    check_result(corr.ot)
                except FloatingPointError as e:
                    problems[pid][spec] = f"failed when drawn: {type(e).__name__}: {e}"
                    bar.update(1)
                    continue
                pred = corr.transfer(pair.src_kps)
                title = (f"{pid} ({pair.category}), {spec}: PCK@0.10 "
                         f"{_pct(pck010(by_id[pid], spec))}, {corr.ot.n_iters} iterations")
                fig = draw_pair(corr, src_img, trg_img, pair, pred, fg, title)
                name = unique_name(f"{safe_name(pid)}__{safe_name(spec)}", ".png", used)
                save_figure(fig, out_dir / PICTURES / name)
                pictures[pid][spec] = name
                bar.update(1)
    finally:
        bar.close()

    text = _render(record, selection, compare, pictures, problems, notes, methods)

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    return atomic_write(out_dir / "index.html", write)
