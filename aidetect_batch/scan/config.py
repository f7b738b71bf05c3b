"""The scan's config (``aidetect-batch scan``), and the scan options other jobs pass through to it.

Every option is declared once, on its field (:func:`aidetect_batch.config.option`); the command line
is derived from the fields.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any

from aidetect_batch.config import (
    DEFAULT_MAX_FILE_MB,
    DEFAULT_MAX_PIXELS,
    JsonConfig,
    check_at_least,
    check_fraction,
    check_max_file_mb,
    internal,
    option,
    parse_actors,
    storage_options_field,
)
from aidetect_batch.detectors import registry
from aidetect_batch.detectors.policies import (
    DEFAULT_MAX_TILES,
    DEFAULT_NATIVE_MAX_PIXELS,
    DEFAULT_POLICY,
    POLICIES,
    Framing,
    check_policy,
)
from aidetect_batch.errors import ConfigError
from aidetect_batch.inputs import archives, item
from aidetect_batch.inputs.sources import DEFAULT_EXTENSIONS
from aidetect_batch.media import perturb, provenance, video
from aidetect_batch.report.config import prefix_depth_field
from aidetect_batch.storage import check_filesystem

PRECISIONS = ("fp32", "bf16", "fp16")
# The slowest work the pixel guard admits, an 89 MP HEIC, AVIF or PNG under --phash, took 18-26 s on one core
# of the 2-core box, and 76 s with --watermark, which decodes it again at full resolution (BENCHMARKS.md):
# the defaults leave several times that, and only a file that is stuck reaches them.
DEFAULT_DECODE_TIMEOUT_S = 120.0
WATERMARK_DECODE_TIMEOUT_S = 360.0

NO_CHECKPOINT = (
    "--checkpoint is required: a detector checkpoint (local path or s3:// URI). Get one by training "
    "(`aidetect-batch train DATASET --out DIR` writes DIR/model.pt), by passing CNNDetection's published weights "
    "(e.g. blur_jpg_prob0.5.pth, {'model': state_dict}), or a torchvision state dict with a 1- or 2-logit "
    "head (with --arch). `aidetect-batch demo` trains a small one offline."
)


def check_detector(preprocess: str | None, arch: str | None, *, gpu_decode: bool = False) -> None:
    """The policy and architecture checks every job that loads a detector makes; raises :class:`ConfigError`."""
    if arch is not None:
        registry.check_arch(arch)
    if preprocess is not None:
        check_policy(preprocess, arch, gpu_decode=gpu_decode)


def check_watermark() -> None:
    """``--watermark`` needs the optional invisible-watermark package; say how to get it."""
    if importlib.util.find_spec("imwatermark") is None:
        raise ConfigError("--watermark needs the invisible-watermark package: pip install 'aidetect-batch[watermark]'")


def check_model_choices(threshold: float | None, ai_class_index: int | None) -> None:
    """``--threshold`` and ``--ai-class-index``, as the scan and the upload page take them."""
    check_fraction("--threshold", threshold)
    if ai_class_index is not None and ai_class_index not in (0, 1):
        raise ConfigError("--ai-class-index must be 0 or 1")


def media_extensions(extensions: tuple[str, ...], video_frames: int) -> tuple[str, ...]:
    """The extensions a folder walk lists without ``--all-files``: ``extensions`` (the images'), and the videos'
    unless ``--video-frames 0``. Labelled datasets are listed so too: training and evaluation see the scan's files."""
    return (*extensions, *video.EXTENSIONS) if video_frames else extensions


def arch_field(default: str | None = None, help: str = "architecture of a plain state dict") -> Any:
    """``--arch``, with the registry's names as choices."""
    return option(default, choices=lambda: tuple(registry.REGISTRY), help=help)


def native_max_pixels_field() -> Any:
    """``--native-max-pixels``: how ``native`` frames a large image."""
    return option(
        DEFAULT_NATIVE_MAX_PIXELS,
        help="native: larger images are center-cropped to this many pixels, never resized (default: %(default)s)",
    )


def max_tiles_field() -> Any:
    """``--max-tiles``: how many views ``tiles`` takes of an image."""
    return option(DEFAULT_MAX_TILES, help="tiles: most tiles per image (default: %(default)s)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScanOptions(JsonConfig):
    """The scan settings that ``evaluate`` passes through to its scans: speed, framing, provenance and video sampling.

    Attributes:
        batch_size: Images per Classifier forward pass.
        actors: (min, max) Classifier actors; ``None`` chooses from cluster resources.
        native_max_pixels: ``native``: larger images are center-cropped to this many pixels, never resized.
        max_tiles: ``tiles``: at most this many tiles per image, spread evenly over it.
        c2pa: Read and validate a C2PA manifest wherever the bytes carry its marker.
        watermark: Also look for the Stable Diffusion invisible watermark (costly; needs the ``watermark`` extra).
        video_frames: Frames sampled from each video or animated image, scored as views of its one row;
            0 leaves videos ``unsupported`` and scores an animation's first frame, as before.
    """

    batch_size: int = option(64, help="images per model forward pass")
    actors: tuple[int, int] | None = option(
        None, parse=parse_actors, help="Classifier actors: N or MIN,MAX (default: from cluster resources)"
    )
    native_max_pixels: int = native_max_pixels_field()
    max_tiles: int = max_tiles_field()
    c2pa: bool = option(True, help="do not read C2PA manifests (read only where marked)")
    watermark: bool = option(
        False,
        help="also decode the Stable Diffusion invisible watermark (costly; pip install 'aidetect-batch[watermark]')",
    )
    video_frames: int = option(
        video.DEFAULT_FRAMES,
        help="frames sampled evenly over each video (mp4, mov, webm, mkv, avi, found by content) or animated "
        "GIF/WebP/APNG, scored as views of its row; 0 leaves videos unsupported (default: %(default)s)",
    )

    def __post_init__(self) -> None:
        self.validate()

    @property
    def framing(self) -> Framing:
        return Framing(native_max_pixels=self.native_max_pixels, max_tiles=self.max_tiles)

    def as_kwargs(self) -> dict[str, Any]:
        """These options as keyword arguments of :class:`ScanConfig` (or of another :class:`ScanOptions`)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(ScanOptions)}

    def validate(self) -> None:
        """Check value ranges; raises :class:`ConfigError` with the flag to fix."""
        if self.watermark:
            check_watermark()
        check_at_least(self, ("batch_size", "native_max_pixels", "max_tiles"))
        check_at_least(self, ("video_frames",), low=0)
        if self.actors is not None:
            lo, hi = self.actors
            if lo < 1 or hi < lo:
                raise ConfigError(f"--actors needs 1 <= MIN <= MAX, got {lo},{hi}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScanConfig(ScanOptions):
    """Everything one scan needs. Immutable so every stage sees the same values.

    Attributes (beyond :class:`ScanOptions`):
        sources: Local folders, files, globs or ``s3://bucket/prefix`` URIs.
        out: Output directory, local or ``s3://``.
        checkpoint: Detector checkpoint path or URI.
        arch: Architecture, used only for plain state dicts without metadata.
        ai_class_index: Which of two logits means "AI"; only for plain state dicts.
        preprocess: Preprocess policy; ``None`` means the checkpoint's, else ``resize``.
        threshold: Decision threshold on P(AI); ``None`` means the checkpoint's.
        decode_batch_size: Files per CPU decode task batch.
        precision: ``fp32``, ``bf16`` or ``fp16`` (autocast on CUDA).
        cpus_per_actor: CPUs reserved per Classifier actor when it runs on CPU.
        decode_tasks: Concurrent CPU read/decode tasks; ``None``: every CPU the Classifier pool leaves.
        max_pixels: Decompression-bomb guard: images whose header announces more are rejected.
        max_file_mb: Files larger than this are ``too_large`` rows, checked before any byte is read.
        decode_timeout: Seconds one file's provenance, decode and PDQ may take in the per-file watchdog's
            child process before it is killed and the file is a ``timeout`` row; 0: no watchdog; ``None``:
            the default for the checks asked for (:attr:`watchdog_timeout`).
        all_files: Send every listed file to the decoder, not only image extensions.
        extensions: Lower-case extensions accepted without ``all_files``.
        storage_options: Extra fsspec options for remote stores (endpoint, profile, ...).
        prefix_depth: Path components below the source root in the report's per-prefix breakdown
            (``--prefix-depth``; ``--group-depth`` is its old name).
        rows_per_file: Rows per scores Parquet file.
        overwrite: Replace the contents of a non-empty ``out``.
        perturbation: A robustness perturbation (``jpeg:75``) applied before preprocessing;
            set by ``evaluate --perturb``.
        manifest: A manifest of paths (Parquet, CSV/TSV or text) instead of ``sources``.
        limit: Scan only the first N inputs (after ``sample``).
        sample: Keep each input with this probability (seeded by position), for trial runs.
        seed: Seed of ``sample``.
        resume: Continue the stopped scan in ``out``: skip the shards its committed files hold.
        dedup: Decode and score identical bytes (SHA-256) once; copies get ``duplicate`` rows.
        commit_every_s: Commit finished shards at least this often (bounds the work a crash loses).
        gpu_decode: Decode JPEGs in the Classifier actor (nvJPEG on CUDA, CPU fallback per file).
        compile: ``torch.compile`` the model in each Classifier actor.
        phash: Compute each decoded image's PDQ hash and quality, for ``aidetect-batch reposts``.
        archives: Expand zip and tar archives into their members (``--no-archives``: scan them as files).
        max_members: Members read per archive; beyond it they are counted and the archive gets a row saying so.
        max_ratio: Decompressed bytes per compressed byte beyond which a member or stream is a bomb (``too_large``).
        archive_depth: Levels of archives inside a listed archive that are expanded; deeper ones are ``unsupported``.
        image_column: The Parquet inputs' column of image bytes; ``None``: the Hugging Face ``Image`` feature.
    """

    sources: tuple[str, ...] = option(positional=True, nargs="*", help="folders, files, globs or s3://bucket/prefix")
    manifest: str | None = option(
        None, help="Parquet, CSV/TSV (a path column) or text file of paths; other columns are kept"
    )
    limit: int | None = option(None, help="scan only the first N inputs (after --sample)")
    sample: float | None = option(None, help="scan a seeded random fraction of the inputs, e.g. 0.01")
    seed: int = option(0, help="seed of --sample")
    resume: bool = option(False, help="continue a stopped scan in --out, skipping its work")
    dedup: bool = option(False, help="score identical bytes once; copies get duplicate_of")
    phash: bool = option(False, help="add each image's PDQ perceptual hash, for 'aidetect-batch reposts'")
    commit_every_s: float = option(
        60.0, flag="--commit-every", help="seconds between commits of finished shards (resume grain)"
    )
    gpu_decode: bool = option(False, help="decode JPEGs on the GPU (nvJPEG) in the Classifier; CPU fallback")
    compile: bool = option(False, help="torch.compile the model in each Classifier")
    checkpoint: str = option(missing=NO_CHECKPOINT, help="detector checkpoint, local or s3://")
    out: str = option(help="output directory, local or s3://")
    arch: str | None = arch_field(
        help=f"architecture of a plain state dict (default: guessed, else {registry.DEFAULT_ARCH})"
    )
    ai_class_index: int | None = option(None, help="which of two logits means AI, for plain state dicts")
    preprocess: str | None = option(
        None, choices=POLICIES, help=f"default: the checkpoint's policy, else {DEFAULT_POLICY}"
    )
    threshold: float | None = option(
        None, help="P(AI) at or above which a file is labelled ai (default: the checkpoint's)"
    )
    decode_batch_size: int = option(16, help="files per CPU decode batch")
    precision: str = option("fp32", choices=PRECISIONS, help="autocast precision on GPU")
    cpus_per_actor: int | None = option(None, help="CPUs per Classifier actor when running on CPU")
    decode_tasks: int | None = option(
        None,
        help="concurrent CPU decode tasks (default: the CPUs the Classifier actors leave; set on autoscaling clusters)",
    )
    max_pixels: int = option(DEFAULT_MAX_PIXELS, help="decompression-bomb guard")
    max_file_mb: float = option(
        DEFAULT_MAX_FILE_MB, help="files larger than this are too_large rows and are never read (default: %(default)s)"
    )
    decode_timeout: float | None = option(
        None,
        help="seconds one file's decode (with provenance and PDQ) may take in its watched process before it is "
        "killed and the file is a timeout row; a decoder that crashes loses only its file (a crashed row); "
        f"0 decodes in the task, unwatched (default: {DEFAULT_DECODE_TIMEOUT_S:g}, {WATERMARK_DECODE_TIMEOUT_S:g} "
        "with --watermark: several times the slowest decode --max-pixels admits)",
    )
    all_files: bool = option(False, help="decode every file, not only image extensions")
    extensions: tuple[str, ...] = internal(DEFAULT_EXTENSIONS, "the image extensions; --all-files lifts them")
    storage_options: dict[str, Any] = storage_options_field()
    prefix_depth: int = prefix_depth_field("path components below the source root in the report")
    rows_per_file: int = option(250_000, help="rows per scores Parquet file")
    overwrite: bool = option(False, help="replace a previous scan in --out")
    perturbation: str | None = internal(None, "set by evaluate --perturb")
    archives: bool = option(True, help="scan zip and tar archives as files instead of reading their members")
    max_members: int = option(100_000, help="members read per archive; the rest are counted (default: %(default)s)")
    # Deflate inflates at most ~1032:1 and images are stored near 1:1 (JPEG, PNG) or under ~20:1 (BMP, TIFF
    # of photos); 100:1 passes any real picture and stops a bomb after its first MiB beyond the floor.
    max_ratio: float = option(
        100.0, help="decompressed/compressed size beyond which a member is a zip bomb (default: %(default)s)"
    )
    archive_depth: int = option(
        1,
        help="levels of archives inside an archive that are expanded; deeper ones are unsupported "
        "(default: %(default)s)",
    )
    image_column: str | None = option(
        None,
        help="Parquet inputs: the column of image bytes, binary or struct<bytes, path> "
        "(default: the Image feature of a Hugging Face dataset's metadata)",
    )

    @property
    def media_extensions(self) -> tuple[str, ...]:
        """The extensions listed without ``--all-files``: the images', and the videos' unless ``--video-frames 0``."""
        return media_extensions(self.extensions, self.video_frames)

    @property
    def video_budget_s(self) -> float:
        """Decode seconds per video before sampling stops with the frames it has: at most half the watchdog's
        deadline, so a slow clip keeps its frames instead of becoming a ``timeout`` row."""
        timeout = self.watchdog_timeout
        return min(video.DEFAULT_BUDGET_S, timeout / 2) if timeout else video.DEFAULT_BUDGET_S

    @property
    def checks(self) -> provenance.Checks:
        return provenance.Checks(c2pa=self.c2pa, watermark=self.watermark, max_pixels=self.max_pixels)

    @property
    def input_kinds(self) -> tuple[item.Kind, ...]:
        """The input kinds this scan expands units with: ``--no-archives`` leaves out the archives (zip, tar)."""
        kinds = item.registered()
        return kinds if self.archives else tuple(k for k in kinds if not isinstance(k, archives.ArchiveKind))

    @property
    def containers(self) -> item.ContainerOptions:
        """Which archive members are read, the archive limits, and the Parquet inputs' image column."""
        admitted = None if self.all_files else (*self.media_extensions, *archives.EXTENSIONS)
        return item.ContainerOptions(
            admitted, self.max_members, self.max_ratio, self.archive_depth, image_column=self.image_column
        )

    @property
    def watchdog_timeout(self) -> float:
        """``--decode-timeout``, or its default: longer with ``--watermark``, which decodes each file twice."""
        if self.decode_timeout is not None:
            return self.decode_timeout
        return WATERMARK_DECODE_TIMEOUT_S if self.watermark else DEFAULT_DECODE_TIMEOUT_S

    @property
    def max_file_bytes(self) -> int:
        return int(self.max_file_mb * 2**20)

    @property
    def group_depth(self) -> int:
        """Old name of :attr:`prefix_depth`."""
        return self.prefix_depth

    def validate(self) -> None:
        """Check value ranges and names; raises :class:`ConfigError` with the flag to fix."""
        super().validate()
        self._check_inputs()
        if self.resume and self.overwrite:
            raise ConfigError("--resume continues the scan in --out and --overwrite replaces it; pick one")
        if not self.out:
            raise ConfigError("--out is required")
        for uri in (*self.sources, self.manifest or "", self.checkpoint, self.out):
            check_filesystem(uri)
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        check_model_choices(self.threshold, self.ai_class_index)
        check_at_least(self, ("decode_batch_size", "max_pixels", "rows_per_file", "cpus_per_actor", "decode_tasks"))
        check_detector(self.preprocess, self.arch, gpu_decode=self.gpu_decode)
        check_max_file_mb(self.max_file_mb)
        check_at_least(self, ("max_members",))
        if self.max_ratio <= 1.0:
            raise ConfigError(f"--max-ratio must be above 1, not {self.max_ratio}")
        check_at_least(self, ("prefix_depth", "commit_every_s", "archive_depth", "decode_timeout"), low=0)
        if self.perturbation is not None:
            try:
                perturb.parse(self.perturbation)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None

    def _check_inputs(self) -> None:
        if not self.sources and not self.manifest:
            raise ConfigError(
                "no sources given: name at least one folder, file, glob or s3:// prefix, or --manifest FILE"
            )
        if self.sources and self.manifest:
            raise ConfigError("give either sources or --manifest, not both")
        check_at_least(self, ("limit",))
        if self.sample is not None and not 0.0 < self.sample <= 1.0:
            raise ConfigError(f"--sample takes a fraction in (0, 1], not {self.sample}")
