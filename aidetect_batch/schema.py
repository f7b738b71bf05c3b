"""Column names, dtypes and statuses of every table the scanner writes.

This is the single source of truth: stages, sinks, the report and the tests
import names from here instead of spelling strings.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

import pyarrow as pa


class Status(str, enum.Enum):
    """Outcome of one input file. Every input yields exactly one row with one of these."""

    OK = "ok"
    """Decoded, preprocessed and scored."""
    UNREADABLE = "unreadable"
    """The bytes could not be read (missing, permission denied, storage error)."""
    EMPTY = "empty"
    """The file has zero bytes."""
    UNDECODABLE = "undecodable"
    """The bytes are not an image any installed decoder recognises, or they are corrupt."""
    TRUNCATED = "truncated"
    """A recognised image whose data ends early; never silently accepted."""
    TOO_LARGE = "too_large"
    """The header announces more pixels than ``max_pixels`` (decompression-bomb guard)."""
    UNSUPPORTED = "unsupported"
    """A recognised media type that this build cannot decode (PDF, SVG, odd modes, a video without a video
    stream, any video under ``--video-frames 0`` or ``--gpu-decode``)."""
    TIMEOUT = "timeout"
    """Decoding it ran past ``--decode-timeout``; its process was killed so the rest of the batch goes on."""
    CRASHED = "crashed"
    """The decoder's process died on it (an abort, a segfault, the OOM killer); only this file is lost."""
    DUPLICATE = "duplicate"
    """``--dedup``: the same bytes (SHA-256) as the file named in ``duplicate_of``, which was scored instead."""

    def __str__(self) -> str:
        return self.value


LABEL_AI = "ai"
LABEL_REAL = "real"

# Columns of OUT/scores/*.parquet
PATH = "path"
SOURCE = "source"
STATUS = "status"
ERROR = "error"
SCORE = "score"
LABEL = "label"
FORMAT = "format"
MODE = "mode"
WIDTH = "width"
HEIGHT = "height"
FILE_SIZE = "file_size"
SHA256 = "sha256"
PREPROCESS = "preprocess"
MODEL_ID = "model_id"
T_READ_MS = "t_read_ms"
T_DECODE_MS = "t_decode_ms"
T_INFER_MS = "t_infer_ms"
DUPLICATE_OF = "duplicate_of"
SCORE_MAX = "score_max"
N_TILES = "n_tiles"
COVERAGE = "coverage"
PDQ = "pdq"
# A video or animation (``--video-frames``): frames scored (each one view, or one stack of tiles), the clip's
# length and average frame rate, its codec, and the time (seconds) of its most AI-looking frame.
N_FRAMES = "n_frames"
DURATION_S = "duration_s"
FPS = "fps"
CODEC = "codec"
FRAME_MAX_T = "frame_max_t"
PDQ_QUALITY = "pdq_quality"
PROVENANCE = "provenance"
PROVENANCE_DETAIL = "provenance_detail"
# An archive member's row: the archive's URI and the member's name (null for a loose file).
CONTAINER = "container"
MEMBER = "member"
# A WebDataset sample's key, and its ``.txt`` caption and ``.json`` url when the shard has them.
WDS_KEY = "wds_key"
WDS_CAPTION = "wds_caption"
WDS_URL = "wds_url"
# A Parquet image dataset row: the path its image struct names (Hugging Face's Image feature), next to its bytes.
IMAGE_PATH = "image_path"
# A column a Parquet dataset carries through whose name is an output column (``label``) or starts with ``_`` is
# written under this prefix (``input_label``).
CARRIED_PREFIX = "input_"

# What a file's own bytes say about its origin (:mod:`aidetect_batch.media.provenance`), strongest first.
PROVENANCE_KINDS = (
    "c2pa_ai",  # a validated C2PA manifest declares trainedAlgorithmicMedia
    "c2pa_ai_composite",  # ... compositeWithTrainedAlgorithmicMedia, or an ingredient that is AI media
    "iptc_ai",  # XMP Iptc4xmpExt:DigitalSourceType declares (composite) trained algorithmic media
    "generator_params",  # AUTOMATIC1111 / ComfyUI / InvokeAI parameters in text chunks or EXIF UserComment
    "watermark_sd",  # the Stable Diffusion invisible watermark (--watermark)
    "c2pa_other",  # a validated C2PA manifest that declares no AI source
    "software_hint",  # EXIF/PNG Software names a generator or an editor
    "c2pa_invalid",  # a C2PA manifest that fails validation or cannot be parsed: never proof
)
# The kinds that state AI origin outright; the report lists these files and evaluation scores them as a detector.
DEFINITE_AI = ("c2pa_ai", "c2pa_ai_composite", "iptc_ai", "generator_params", "watermark_sd")

# Intermediate columns between the stages; never written: the preprocessed image, the
# file's bytes (``--gpu-decode``), a name's raw bytes, the input shard a row belongs to
# (resume) and, in a streamed listing, how many rows that shard has.
IMAGE = "image"
# The ``tiles`` and ``native`` views, whose shapes differ from row to row: uint8 bytes and their shape.
PIXELS = "_pixels"
PIXEL_SHAPE = "_pixel_shape"
DATA = "_data"
# A local file name's exact bytes when it is not valid UTF-8 (``path`` then holds its %XX-escaped form).
RAW_PATH = "_raw_path"
SHARD = "_shard"
# A video row's sampled frame times (seconds), in the order of its views: the Classifier names the top one.
FRAME_TIMES = "_frame_times"
# ... and each of those frames' P(AI), from the Classifier: the sink writes both to OUT/frames/ with the row's shard.
FRAME_SCORES = "_frame_scores"
SHARD_ROWS = "_shard_rows"

# Columns of a labelled dataset listing (train/evaluate). They pass through the scan
# pipeline and are written next to the scores of an evaluation.
TRUE_LABEL = "true_label"
GROUP = "group"
SPLIT = "split"
SPLITS = ("train", "val", "test")
LABELLED_SCHEMA = pa.schema(
    [
        pa.field(PATH, pa.string(), nullable=False),
        pa.field(SOURCE, pa.string()),
        pa.field(TRUE_LABEL, pa.string(), nullable=False),
        pa.field(GROUP, pa.string()),
        pa.field(SPLIT, pa.string()),
    ]
)

SCORES_SCHEMA = pa.schema(
    [
        pa.field(PATH, pa.string(), nullable=False),
        pa.field(SOURCE, pa.string()),
        pa.field(STATUS, pa.string(), nullable=False),
        pa.field(ERROR, pa.string()),
        pa.field(SCORE, pa.float32()),
        pa.field(SCORE_MAX, pa.float32()),
        pa.field(FRAME_MAX_T, pa.float32()),
        pa.field(LABEL, pa.string()),
        pa.field(PROVENANCE, pa.string()),
        pa.field(PROVENANCE_DETAIL, pa.string()),
        pa.field(FORMAT, pa.string()),
        pa.field(MODE, pa.string()),
        pa.field(WIDTH, pa.int32()),
        pa.field(HEIGHT, pa.int32()),
        pa.field(FILE_SIZE, pa.int64()),
        pa.field(SHA256, pa.string()),
        pa.field(PDQ, pa.binary(32)),
        pa.field(PDQ_QUALITY, pa.int16()),
        pa.field(PREPROCESS, pa.string()),
        pa.field(N_TILES, pa.int32()),
        pa.field(COVERAGE, pa.float32()),
        pa.field(N_FRAMES, pa.int32()),
        pa.field(DURATION_S, pa.float32()),
        pa.field(FPS, pa.float32()),
        pa.field(CODEC, pa.string()),
        pa.field(MODEL_ID, pa.string()),
        pa.field(T_READ_MS, pa.float32()),
        pa.field(T_DECODE_MS, pa.float32()),
        pa.field(T_INFER_MS, pa.float32()),
        pa.field(DUPLICATE_OF, pa.string()),
        pa.field(CONTAINER, pa.string()),
        pa.field(MEMBER, pa.string()),
        pa.field(WDS_KEY, pa.string()),
        pa.field(WDS_CAPTION, pa.string()),
        pa.field(WDS_URL, pa.string()),
        pa.field(IMAGE_PATH, pa.string()),
    ]
)
# The columns an input kind fills per row (:class:`aidetect_batch.inputs.item.Read`).
ITEM_COLUMNS = (CONTAINER, MEMBER, WDS_KEY, WDS_CAPTION, WDS_URL, IMAGE_PATH)

SCORE_COLUMNS = tuple(SCORES_SCHEMA.names)
# The columns decoding one file fills in, on the CPU stage or in the Classifier (--gpu-decode).
DECODED_COLUMNS = (STATUS, ERROR, FORMAT, MODE, WIDTH, HEIGHT, COVERAGE, T_DECODE_MS, PDQ, PDQ_QUALITY)
# ... and, for a video or animation, the CPU stage alone (``--gpu-decode`` leaves videos ``unsupported``).
CLIP_COLUMNS = (N_FRAMES, DURATION_S, FPS, CODEC, FRAME_TIMES)
# Types of the hidden columns a stage hands the next one (never written).
HIDDEN_TYPES = {FRAME_TIMES: pa.list_(pa.float64()), FRAME_SCORES: pa.list_(pa.float32())}

# Columns of OUT/frames/*.parquet: one row per sampled frame of each scored video or animation (where in the clip
# it looks generated). ``path`` is the row's in the scores; ``frame_index`` counts its scored frames from 0 in time
# order; ``t`` and ``score`` are as ``frame_max_t`` and ``score_max`` are for its top frame.
FRAME_INDEX = "frame_index"
FRAME_T = "t"
FRAMES_SCHEMA = pa.schema(
    [
        pa.field(PATH, pa.string(), nullable=False),
        pa.field(FRAME_INDEX, pa.int32(), nullable=False),
        pa.field(FRAME_T, pa.float32()),
        pa.field(SCORE, pa.float32()),
    ]
)

# What a row is in the report's counts: a video (its format is a video container), an animated GIF/WebP/APNG
# (frames sampled, not a container) or a still (everything else, videos under ``--video-frames 0`` included).
MEDIA_STILL = "still"
MEDIA_VIDEO = "video"
MEDIA_ANIMATION = "animation"
MEDIA_KINDS = (MEDIA_STILL, MEDIA_VIDEO, MEDIA_ANIMATION)

# Directory layout of OUT
SCORES_DIR = "scores"
# Each scores file's frame rows, under the same file name, committed just before it (none for stills only).
FRAMES_DIR = "frames"
# Key of a scores file's Parquet metadata listing the input shards it holds in full (resume).
SHARDS_METADATA_KEY = b"aidetect.shards"
# ... and each of those shards' order-independent path digest (a resumed streamed listing checks them).
SHARD_DIGESTS_METADATA_KEY = b"aidetect.shard_digests"
REPORT_DIR = "report"
# aidetect-batch reposts: members.parquet, groups.parquet, summary.json
REPOSTS_DIR = "reposts"
REPOST_GROUPS_FILE = "groups.parquet"
RUN_FILE = "_run.json"
SUMMARY_FILE = "summary.json"

# Directory layout of a training run's OUT
MODEL_FILE = "model.pt"
SPLITS_FILE = "splits.parquet"
DATASET_FILE = "dataset.json"
HISTORY_FILE = "history.parquet"
TRAIN_STATE_DIR = "ray_train"

# Directory layout of an evaluation's OUT
METRICS_FILE = "metrics.json"
EVAL_SCAN_DIR = "scan"
PERTURBED_DIR = "perturbed"
PLOTS_DIR = "plots"


@dataclasses.dataclass(frozen=True)
class RunFacts:
    """A scan's run-level facts, shown beside its aggregates (``summary.json``, the HTML page, the CLI)."""

    threshold: float | None = None
    preprocess: str | None = None
    model_id: str | None = None
    untrained_model: bool = False
    wall_seconds: float | None = None
    images_per_s: float | None = None
    first_result_seconds: float | None = None


@dataclasses.dataclass(frozen=True)
class Summary:
    """A scan's aggregates over its scores, as ``report/summary.json`` holds them.

    ``histogram`` is columnar (``bin_start``, ``bin_end``, ``all``, ``ai``, ``real``); ``prefixes``,
    ``errors`` and ``provenance`` are the rows of ``prefixes.parquet``, ``errors.parquet`` and
    ``provenance.parquet`` (files per provenance kind, strongest first, and how many the model labelled ai/real);
    ``media`` those of ``media.parquet``: one per :data:`MEDIA_KINDS`, with the prefixes' counts and the frames
    scored, so flagged videos are counted apart from flagged stills.
    """

    total: int
    ok: int
    failed: int
    duplicates: int
    status_counts: dict[str, int]
    label_counts: dict[str, int]
    format_counts: dict[str, int]
    histogram: dict[str, list[float]]
    prefixes: list[dict[str, Any]]
    errors: list[dict[str, Any]]
    stage_images_per_s: dict[str, float | None]
    provenance: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    media: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    facts: RunFacts = RunFacts()

    def to_json(self, *, prefixes: int, errors: int) -> dict[str, Any]:
        """The flat document of ``summary.json``, with at most ``prefixes`` and ``errors`` rows."""
        document = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "facts"}
        document.update(prefixes=self.prefixes[:prefixes], errors=self.errors[:errors])
        return {**document, **dataclasses.asdict(self.facts)}
