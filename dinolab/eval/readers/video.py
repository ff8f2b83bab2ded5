"""Action recognition datasets: UCF101 / Kinetics-style folders of videos (``class/xxx.avi|mp4``) or of extracted
frames (``class/video_id/frame_0001.jpg``), optionally restricted by a UCF101-style split list."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from dinolab.data.images import IMAGE_EXTENSIONS, load_rgb

VIDEO_EXTENSIONS = (".avi", ".mp4", ".mkv", ".webm", ".mov", ".mpg", ".mpeg")


@dataclass(frozen=True)
class VideoSet:
    """Videos (files or frame folders) and their class indices."""

    name: str
    videos: list[Path]
    labels: np.ndarray  # [V] int64 index into classes
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.videos:
            raise ValueError(f"{self.name}: no videos found; expected class/xxx.mp4 or class/video_id/*.jpg")
        if len(self.videos) != len(self.labels):
            raise ValueError(f"{self.name}: {len(self.videos)} videos but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.videos)


def video_folders(
    root: str | os.PathLike, split_list: str | os.PathLike | None = None, classes: tuple[str, ...] | None = None
) -> VideoSet:
    """Videos under ``root/{class}/``: files with a video extension, or sub-folders of frame images.

    ``split_list`` (UCF101 ``trainlist01.txt`` / ``testlist01.txt`` style: ``Class/v_x.avi [label]`` per line)
    restricts the set; an entry whose file is missing is looked up as a frame folder (``Class/v_x``).
    ``classes`` fixes the class order (pass the training set's so labels agree across splits).
    """
    base = Path(root).expanduser()
    if not base.is_dir():
        raise FileNotFoundError(f"video folder {base} does not exist")
    if split_list is not None:
        videos = [_resolve_entry(base, line.split()[0]) for line in _lines(Path(split_list))]
    else:
        videos = [v for class_dir in sorted(p for p in base.iterdir() if p.is_dir()) for v in _videos_in(class_dir)]
    found_classes = tuple(sorted({v.relative_to(base).parts[0] for v in videos}))
    classes = classes or found_classes
    unknown = sorted(set(found_classes) - set(classes))
    if unknown:
        raise ValueError(f"{base}: classes {unknown[:5]} are not among the {len(classes)} training classes")
    index = {c: i for i, c in enumerate(classes)}
    labels = np.asarray([index[v.relative_to(base).parts[0]] for v in videos], dtype=np.int64)
    return VideoSet(f"videos/{base.name}", videos, labels, classes)


def _lines(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"split list {path} does not exist")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _resolve_entry(base: Path, entry: str) -> Path:
    path = base / entry
    if path.is_file() or path.is_dir():
        return path
    if path.with_suffix("").is_dir():
        return path.with_suffix("")
    raise FileNotFoundError(f"split entry {entry}: neither {path} nor the frame folder {path.with_suffix('')} exists")


def _videos_in(class_dir: Path) -> list[Path]:
    videos = []
    for item in sorted(class_dir.iterdir()):
        is_video_file = item.is_file() and item.suffix.lower() in VIDEO_EXTENSIONS
        if is_video_file or (item.is_dir() and frame_files(item)):
            videos.append(item)
    return videos


def frame_files(folder: Path) -> list[Path]:
    """The frame images of an extracted-frames video folder, in name order."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def sample_indices(num_frames: int, num_samples: int) -> np.ndarray:
    """``num_samples`` frame indices spread uniformly: the centre frame of each of ``num_samples`` equal
    segments (a video shorter than that repeats frames)."""
    if num_frames < 1:
        raise ValueError("cannot sample frames from an empty video")
    centres = (np.arange(num_samples) + 0.5) * num_frames / num_samples
    return np.minimum(centres.astype(np.int64), num_frames - 1)


def read_frames(video: Path, num_samples: int) -> list[Image.Image]:
    """``num_samples`` uniformly sampled RGB frames of a frame folder or a video file (decoded with PyAV)."""
    if video.is_dir():
        files = frame_files(video)
        if not files:
            raise ValueError(f"{video}: frame folder holds no images")
        return [load_rgb(files[i]) for i in sample_indices(len(files), num_samples)]
    return _decode_video(video, num_samples)


def _decode_video(path: Path, num_samples: int) -> list[Image.Image]:
    try:
        import av
    except ImportError as error:
        raise ImportError(
            f"decoding {path} needs PyAV: pip install 'dinolab[video]' (or pip install av), "
            "or extract frames to class/video_id/frame_0001.jpg folders"
        ) from error
    with av.open(str(path)) as container:
        declared = container.streams.video[0].frames  # from the header; 0 when unknown, sometimes wrong
        if declared > 0:
            wanted = sample_indices(declared, num_samples)
            kept: dict[int, Image.Image] = {}
            for i, frame in enumerate(container.decode(video=0)):
                if i in wanted:
                    kept[i] = frame.to_image()
                if i >= wanted.max():
                    break
            if len(kept) == len(set(wanted.tolist())):
                return [kept[i] for i in wanted]
    # unknown or wrong frame count: decode everything once, then sample
    with av.open(str(path)) as container:
        frames = [frame.to_image() for frame in container.decode(video=0)]
    if not frames:
        raise ValueError(f"{path}: no video frames could be decoded")
    return [frames[i] for i in sample_indices(len(frames), num_samples)]
