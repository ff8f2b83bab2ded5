"""Instance retrieval datasets: revisited Oxford / Paris (``gnd_roxford5k.pkl``, ``gnd_rparis6k.pkl``) and a
generic query folder / database folder pair with a relevance file."""

from __future__ import annotations

import io
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dinolab.data.images import IMAGE_EXTENSIONS

Box = tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels of the full image


@dataclass(frozen=True)
class QueryTruth:
    """Database indices relevant to one query, in the revisited protocol's three groups."""

    easy: np.ndarray
    hard: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    junk: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


@dataclass(frozen=True)
class RetrievalSet:
    """Query images (with optional crop boxes), database images and per-query ground truth."""

    name: str
    queries: list[Path]
    database: list[Path]
    truth: list[QueryTruth]
    boxes: list[Box | None]
    protocols: tuple[str, ...] = ("easy", "medium", "hard")
    """Protocols that make sense for this ground truth (a plain relevance file has only one)."""

    def __post_init__(self) -> None:
        if not self.queries or not self.database:
            raise ValueError(f"{self.name}: needs at least one query and one database image")
        if not len(self.queries) == len(self.truth) == len(self.boxes):
            raise ValueError(f"{self.name}: queries, ground truth and boxes differ in length")
        for q, truth in enumerate(self.truth):
            for group in (truth.easy, truth.hard, truth.junk):
                if group.size and (group.min() < 0 or group.max() >= len(self.database)):
                    raise ValueError(f"{self.name}: query {q} lists a database index outside 0..{len(self.database)}")


class SafeUnpickler(pickle.Unpickler):
    """Unpickles only plain data: builtin containers/scalars and numpy arrays. Any other global (a class or a
    function such as ``os.system`` that a crafted pickle could call) raises ``pickle.UnpicklingError``."""

    ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("collections", "OrderedDict"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "slice"),
        ("builtins", "complex"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to unpickle {module}.{name}: ground-truth files may only hold lists, dicts, numbers, "
            "strings and numpy arrays"
        )


def safe_load_pickle(path: str | os.PathLike) -> object:
    """Load a data-only pickle with :class:`SafeUnpickler` (``latin1`` so Python 2 numpy pickles also load)."""
    data = Path(path).read_bytes()
    return SafeUnpickler(io.BytesIO(data), encoding="latin1").load()


def revisited(root: str | os.PathLike, name: str = "roxford5k") -> RetrievalSet:
    """Revisited Oxford 5k / Paris 6k: ``{root}/{name}/gnd_{name}.pkl`` and ``{root}/{name}/jpg/*.jpg`` (``root``
    may also be the ``{name}`` folder itself). The pickle holds ``imlist``, ``qimlist`` and ``gnd`` (per query:
    ``bbx`` crop box, ``easy``/``hard``/``junk`` database indices)."""
    base = Path(root).expanduser()
    if not (base / f"gnd_{name}.pkl").is_file():
        base = base / name
    gnd_file = base / f"gnd_{name}.pkl"
    if not gnd_file.is_file():
        raise FileNotFoundError(f"no ground-truth file gnd_{name}.pkl in {root} or {Path(root) / name}")
    cfg = safe_load_pickle(gnd_file)
    if not isinstance(cfg, dict) or not {"imlist", "qimlist", "gnd"} <= set(cfg):
        raise ValueError(f"{gnd_file}: expected a dict with 'imlist', 'qimlist' and 'gnd'")
    image_dir = base / "jpg"
    database = [image_dir / f"{n}.jpg" for n in cfg["imlist"]]
    queries = [image_dir / f"{n}.jpg" for n in cfg["qimlist"]]
    truth, boxes = [], []
    for entry in cfg["gnd"]:
        truth.append(QueryTruth(*(np.asarray(entry.get(k, []), dtype=np.int64).reshape(-1) for k in _GROUPS)))
        box = entry.get("bbx")
        boxes.append(tuple(float(v) for v in box) if box is not None and len(box) == 4 else None)
    missing = [p for p in queries + database if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image(s) of {name} missing under {image_dir}, e.g. {missing[0]}")
    return RetrievalSet(name, queries, database, truth, boxes)


_GROUPS = ("easy", "hard", "junk")


def folder_relevance(
    query_dir: str | os.PathLike, database_dir: str | os.PathLike, relevance_file: str | os.PathLike
) -> RetrievalSet:
    """Queries = the images listed in ``relevance_file``; database = every image under ``database_dir``.

    Each line of ``relevance_file`` is ``query<TAB>relevant<TAB>relevant...`` (paths relative to ``query_dir`` /
    ``database_dir``, or absolute); a query may span several lines. A database image that is the query itself
    counts as junk (neither right nor wrong), as in the revisited protocol.
    """
    query_dir, database_dir = Path(query_dir).expanduser(), Path(database_dir).expanduser()
    database = sorted(p for p in database_dir.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    position = {p.resolve(): i for i, p in enumerate(database)}
    relevant: dict[Path, set[int]] = {}
    for number, line in enumerate(Path(relevance_file).read_text().splitlines(), 1):
        fields = [f.strip() for f in line.split("\t") if f.strip()]
        if not fields or fields[0].startswith("#"):
            continue
        query = _under(query_dir, fields[0])
        if not query.is_file():
            raise FileNotFoundError(f"{relevance_file}:{number}: query image {query} does not exist")
        hits = relevant.setdefault(query, set())
        for name in fields[1:]:
            path = _under(database_dir, name).resolve()
            if path not in position:
                raise ValueError(f"{relevance_file}:{number}: {name} is not an image under {database_dir}")
            hits.add(position[path])
    queries = list(relevant)
    truth = []
    for query in queries:
        self_match = [position[query.resolve()]] if query.resolve() in position else []
        ok = sorted(relevant[query] - set(self_match))
        truth.append(QueryTruth(easy=np.asarray(ok, dtype=np.int64), junk=np.asarray(self_match, dtype=np.int64)))
    return RetrievalSet(f"folder/{database_dir.name}", queries, database, truth, [None] * len(queries), ("all",))


def _under(root: Path, name: str) -> Path:
    path = Path(name).expanduser()
    return path if path.is_absolute() else root / path
