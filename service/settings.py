"""Service settings: environment variables with the prefix ``DINO_`` (pydantic-settings).

Every knob of the service lives here, so that ``dino serve`` flags, environment variables and tests
configure the same object. Example: ``DINO_MAX_BATCH_SIZE=64 DINO_API_KEY=secret dino serve``.
List settings (``DINO_CORS_ORIGINS``) accept a JSON list or a comma-separated string.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from dino.model_folder import METADATA_FILE

#: the repository (or installed tree) root: ``service/`` lives directly below it
REPO_ROOT = Path(__file__).resolve().parent.parent
#: where shipped model folders live; the first one (sorted by name) is the default model
MODELS_DIR = REPO_ROOT / "models"


#: the characters allowed in an API key: printable ASCII, space excluded (a bearer token)
PRINTABLE_ASCII_FIRST, PRINTABLE_ASCII_LAST = "!", "~"


class ModelNotFoundError(Exception):
    """No model folder was given and none is shipped, or the given folder is not a model folder."""


def find_default_model(models_dir: Path = MODELS_DIR) -> Path:
    """The first folder (sorted by name) below ``models_dir`` that holds a ``model.json``."""
    candidates = sorted(p.parent for p in models_dir.glob(f"*/{METADATA_FILE}")) if models_dir.is_dir() else []
    if not candidates:
        raise ModelNotFoundError(
            f"no model given and no default model in {models_dir} (no */{METADATA_FILE}); "
            "pass --model models/NAME (or set DINO_MODEL_DIR) to a folder made by 'dino export' or 'dino import'"
        )
    return candidates[0]


class ServiceSettings(BaseSettings):
    """All settings of the feature-extraction service (environment prefix ``DINO_``)."""

    model_config = SettingsConfigDict(env_prefix="DINO_", extra="ignore", protected_namespaces=())

    # --- what to serve -------------------------------------------------------------------------
    model_dir: Path | None = Field(
        None, description="model folder (model.json + model.onnx); default: first folder of <repo>/models"
    )
    gallery: Literal["faiss", "milvus"] = Field(
        "faiss",
        description="gallery backend: faiss (the index folder DINO_INDEX_DIR, one writing process) or milvus "
        "(DINO_MILVUS_URI; a Milvus server is shared by every worker, replica and machine)",
    )
    index_dir: Path | None = Field(
        None,
        description="gallery index folder of the faiss backend (created if missing); default: an in-memory gallery "
        "that is lost on exit",
    )
    index_read_only: bool = Field(
        False, description="serve the gallery without accepting changes (set automatically with --workers > 1)"
    )

    # --- HTTP server ---------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    workers: int = Field(1, ge=1, description="uvicorn worker processes (each loads the model)")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    api_key: SecretStr | None = Field(
        None, description="when set, every route but /healthz and /readyz needs 'Authorization: Bearer <key>'"
    )
    header_timeout: float = Field(
        10.0, gt=0, description="seconds a client has to send a request's head (closed after that)"
    )
    body_timeout: float = Field(
        30.0, gt=0, description="seconds a request body may stall between two chunks (408 after that)"
    )
    keep_alive_timeout: int = Field(5, ge=1, description="seconds an idle kept-alive connection stays open")
    max_header_bytes: int = Field(
        64 * 1024, ge=1024, description="largest request head (request line and headers; 400 above)"
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="origins allowed by CORS; empty (the default) disables CORS"
    )

    # --- inference -----------------------------------------------------------------------------
    provider: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="onnxruntime execution provider; auto = CUDA when a usable GPU is present, else CPU"
    )
    precision: Literal["auto", "fp32", "int8", "fp16"] = Field(
        "auto",
        description="the model file served: auto = fp16 on CUDA when the folder has it, int8 on the CPU when its "
        "measured k-NN drop is at most 0.5 points, else fp32",
    )
    verify_sha256: bool = Field(True, description="check model.onnx against the sha256 recorded in model.json at load")
    intra_op_threads: int = Field(0, ge=0, description="onnxruntime intra-op threads (0: onnxruntime's default)")
    max_batch_size: int | None = Field(
        None,
        ge=1,
        description="most images in one onnxruntime call (default: 16 on the CPU, 32 on CUDA: measured best)",
    )
    max_batch_wait_ms: float = Field(
        5.0, ge=0, description="how long the first queued image waits for others to join its batch"
    )
    max_queue_size: int = Field(
        2048, ge=1, description="images waiting for inference before requests are refused with 503"
    )
    preprocess_threads: int = Field(4, ge=1, description="threads decoding and preprocessing images off the event loop")
    decode_threads_per_request: int | None = Field(
        None, ge=1, description="images of one request decoded at once (default: half the preprocess threads)"
    )
    max_jpeg_scans: int = Field(
        64, ge=1, description="most scans of a (progressive) JPEG: each scan is a pass over the image (413 above)"
    )
    warmup_batches: int = Field(2, ge=0, description="inference calls made before /readyz answers 200")

    # --- request limits ------------------------------------------------------------------------
    max_upload_bytes: int = Field(32 * 1024 * 1024, ge=1, description="largest request body (413 above)")
    max_image_pixels: int = Field(
        40_000_000,
        ge=1,
        description="largest decoded image (width x height, read from the header before decoding; 413 above)",
    )
    max_images_per_request: int = Field(64, ge=1, description="most images in one request (413 above)")
    max_neighbors: int = Field(1000, ge=1, description="largest k of /neighbors")
    max_page_size: int = Field(1000, ge=1, description="most entries per page of GET /index/items")
    max_label_chars: int = Field(256, ge=1, description="longest gallery label")
    max_metadata_bytes: int = Field(16 * 1024, ge=2, description="largest JSON metadata of one gallery image")

    # --- POST /attention/video (a clip's frames go through the model like images) --------------
    max_video_bytes: int = Field(
        16 * 1024 * 1024,
        ge=1,
        description="largest uploaded video of POST /attention/video (413 above; DINO_MAX_UPLOAD_BYTES applies too)",
    )
    max_video_frames: int = Field(
        300, ge=1, description="most frames of one clip run through the model, after sampling at fps (413 above)"
    )
    max_video_seconds: float = Field(
        60.0, gt=0, description="longest clip, from its header and its frames' timestamps (413 above)"
    )
    max_video_frame_pixels: int = Field(
        1920 * 1080,
        ge=1,
        description="largest video frame (width x height, read from the stream before decoding; 413 above)",
    )
    max_video_output_size: int = Field(
        512, ge=16, description="largest side (pixels) of the frames of an attention clip (the 'size' parameter)"
    )

    # --- gallery -------------------------------------------------------------------------------
    index_type: Literal["flat", "hnsw"] = Field(
        "flat", description="flat: exact inner product; hnsw: approximate, for large galleries"
    )
    hnsw_m: int = Field(32, ge=2, description="HNSW graph degree")
    hnsw_ef_construction: int = Field(200, ge=1, description="HNSW candidate list size while adding")
    hnsw_ef_search: int = Field(
        128, ge=1, description="HNSW candidate list size while searching (raised to k if smaller)"
    )
    index_compact_every: int = Field(
        1000, ge=1, description="journal entries after which the gallery is compacted into a new snapshot"
    )
    thumbnail_size: int | None = Field(
        None,
        ge=8,
        description="side of the stored gallery images (the model's centre crop); default: the model's image_size, "
        "so that GET /attention/{id} sees exactly what the model saw",
    )
    thumbnail_quality: int = Field(90, ge=1, le=100, description="JPEG quality of the stored gallery images")
    gallery_threads: int = Field(
        4, ge=1, description="threads doing gallery work (disk, Milvus calls), apart from the decoding threads"
    )

    # --- the milvus gallery backend ------------------------------------------------------------
    milvus_uri: str | None = Field(
        None,
        description="a path ending in .db: Milvus Lite inside this process (one process); http://HOST:19530: a "
        "Milvus server or cluster that several processes share",
    )
    milvus_token: SecretStr | None = Field(None, description="Milvus credentials: 'user:password' or an API key")
    milvus_collection: str | None = Field(
        None, description="Milvus collection; default dino_<model name>_<embedding dim> (one per model)"
    )
    milvus_index_type: Literal["HNSW", "FLAT", "IVF_FLAT", "AUTOINDEX"] = Field(
        "HNSW", description="Milvus vector index (metric IP on L2-normalised embeddings = cosine)"
    )
    milvus_index_params: dict[str, Any] | None = Field(
        None,
        description="JSON build parameters of the Milvus index; default: HNSW M/efConstruction from DINO_HNSW_M and "
        "DINO_HNSW_EF_CONSTRUCTION, IVF_FLAT nlist 1024",
    )
    milvus_search_params: dict[str, Any] | None = Field(
        None,
        description="JSON search parameters of the Milvus index; default: HNSW ef from DINO_HNSW_EF_SEARCH "
        "(raised to k), IVF_FLAT nprobe 16",
    )
    milvus_consistency: Literal["Strong", "Bounded", "Session", "Eventually"] = Field(
        "Strong",
        description="consistency level of gallery reads; Strong: a search sees every add acknowledged before it, "
        "by any process",
    )
    milvus_timeout: float = Field(10.0, gt=0, description="seconds one Milvus call may take (503 after that)")
    milvus_retry_interval: float = Field(
        2.0, gt=0, description="seconds between health checks of Milvus, and between reconnections while it is down"
    )

    @field_validator("api_key", "milvus_token", "milvus_uri", "milvus_collection", "index_dir", mode="before")
    @classmethod
    def _empty_is_unset(cls, value):
        """``DINO_API_KEY=`` (set but empty, as compose files and shells often leave it) means no key,
        not "require an empty bearer token", which would lock every client out; likewise an empty index
        folder, Milvus URI, token or collection means "not set" (``DINO_INDEX_DIR=`` turns off the image's
        default folder)."""
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @field_validator("api_key")
    @classmethod
    def _key_a_client_can_send(cls, value: SecretStr | None) -> SecretStr | None:
        """A key that no client could ever send would lock every client out: refuse it at startup.
        HTTP header values are Latin-1 bytes and their surrounding whitespace is stripped, so a key must
        be printable ASCII without spaces (what a bearer token is, RFC 6750)."""
        if value is None:
            return None
        key = value.get_secret_value()
        bad = sorted({c for c in key if not PRINTABLE_ASCII_FIRST <= c <= PRINTABLE_ASCII_LAST})
        if bad:
            names = ", ".join("space" if c == " " else repr(c) for c in bad)
            raise ValueError(
                f"the API key holds characters no client can send in an Authorization header ({names}); "
                "use printable ASCII without spaces, e.g. the output of 'openssl rand -hex 32'"
            )
        return value

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value):
        """Accept a JSON list or a comma-separated string (the natural forms of an environment variable)."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [origin.strip() for origin in text.split(",") if origin.strip()]
        return value

    @model_validator(mode="after")
    def _milvus_needs_a_uri(self) -> ServiceSettings:
        """DINO_GALLERY=milvus without DINO_MILVUS_URI would leave nowhere to store the gallery."""
        if self.gallery == "milvus" and not self.milvus_uri:
            raise ValueError(
                "DINO_GALLERY=milvus needs DINO_MILVUS_URI: a Milvus server (http://HOST:19530) or a Milvus Lite "
                "path ending in .db"
            )
        return self

    def resolved_model_dir(self) -> Path:
        """The model folder to serve: ``model_dir`` or the default shipped model; checked to hold a model.json."""
        model_dir = self.model_dir if self.model_dir is not None else find_default_model()
        if not (model_dir / METADATA_FILE).is_file():
            raise ModelNotFoundError(
                f"{model_dir} is not a model folder (no {METADATA_FILE}); make one with 'dino export' or 'dino import'"
            )
        return model_dir
