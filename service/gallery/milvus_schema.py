"""The Milvus collection of a gallery: its name, fields, limits, index parameters, and the image codec.

One row per gallery image::

    id        VARCHAR(32), primary key     the gallery id (32 hex digits), same as the FAISS store's
    embedding FLOAT_VECTOR(dim)            L2-normalised; searched with the IP metric (= cosine)
    label     VARCHAR, nullable
    metadata  JSON, nullable
    image     ARRAY<VARCHAR(65535)>        the stored JPEG, base64, cut into chunks (empty: no image)
    added_at  INT64                        nanoseconds since the epoch (+ position in the batch): listing order

Why the image is in the row: every replica reads it from the one place that already holds the
entry, an add stores embedding and image in one write (nothing to reconcile when a process dies in
between), a delete removes both, and a backup of the collection is a backup of the gallery. Milvus
has no bytes scalar type (BINARY_VECTOR is a vector of at most 32,768 bits, indexed as one) and a
VARCHAR holds at most 65,535 bytes, so the JPEG is base64 text (+33 %) in an ARRAY of up to
:data:`IMAGE_CHUNKS` VARCHARs: up to 786,420 bytes of JPEG, far above a thumbnail of the model's
crop (a 224 px crop at quality 90 is 10-30 kB; the 4,096-element limit of an ARRAY is not near).

The collection's properties record the model (``dino.model_sha256``, ``dino.model_name``,
``dino.dim``; the description repeats them as JSON): a service whose model differs refuses the
collection, as the FAISS store refuses a folder built by another model.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from service.gallery.base import GalleryEntryTooLarge, GalleryError

#: Milvus's largest VARCHAR (bytes)
VARCHAR_MAX_BYTES = 65_535
#: base64 text of an image is cut into chunks of this many characters (one VARCHAR each)
IMAGE_CHUNK_CHARS = VARCHAR_MAX_BYTES
#: most chunks of one image (the ARRAY's max_capacity)
IMAGE_CHUNKS = 16
#: largest storable JPEG: base64 makes 4 characters of every 3 bytes
MAX_IMAGE_BYTES = IMAGE_CHUNKS * IMAGE_CHUNK_CHARS // 4 * 3
#: Milvus's default limit of one JSON value (bytes)
MAX_METADATA_BYTES = 65_536
#: Milvus allows letters, digits and underscores, starting with a letter or underscore, up to 255 characters
COLLECTION_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")
#: room left in a derived name for the model part (prefix and dimension take the rest)
MODEL_NAME_CHARS = 200
#: the gallery's fields in the collection (checked when an existing collection is opened)
FIELDS = ("id", "embedding", "label", "metadata", "image", "added_at")
ID_CHARS = 32
VECTOR_FIELD = "embedding"
METRIC = "IP"
#: collection properties recording the model whose embeddings are stored
PROP_MODEL_SHA = "dino.model_sha256"
PROP_MODEL_NAME = "dino.model_name"
PROP_DIM = "dino.dim"
PROP_FORMAT = "dino.format"
FORMAT_VERSION = "1"
#: the collection's description: this prefix, then the model properties as JSON
DESCRIPTION_PREFIX = "DINO gallery "
#: a URI with one of these schemes names a Milvus server; anything else is a Milvus Lite file
SERVER_SCHEMES = ("http", "https", "tcp", "unix")
#: pymilvus opens Milvus Lite for URIs ending in this
LITE_SUFFIX = ".db"


def default_collection_name(model_name: str, dim: int) -> str:
    """``dino_<model name>_<dim>``, the model name reduced to what Milvus allows: two models (or one
    model at two sizes) never share a collection unless an operator says so."""
    slug = re.sub(r"[^a-z0-9]+", "_", model_name.lower()).strip("_")[:MODEL_NAME_CHARS] or "model"
    return f"dino_{slug}_{dim}"


def check_collection_name(name: str) -> str:
    """``name`` when Milvus accepts it as a collection name, else GalleryError saying what is allowed."""
    if not COLLECTION_NAME_RE.fullmatch(name):
        raise GalleryError(
            f"invalid Milvus collection name {name!r}: letters, digits and underscores, "
            "starting with a letter or underscore, at most 255 characters"
        )
    return name


def is_server_uri(uri: str) -> bool:
    """True for a Milvus server (``http://host:19530``), False for a Milvus Lite file path."""
    scheme, separator, _ = uri.partition("://")
    return bool(separator) and scheme.lower() in SERVER_SCHEMES or uri.startswith("unix:")


def lite_path(uri: str) -> Path:
    """The Milvus Lite database of a local URI (a folder whose name ends in ``.db``)."""
    path = Path(uri).expanduser()
    if not path.name.endswith(LITE_SUFFIX) or path.name == LITE_SUFFIX:
        raise GalleryError(
            f"DINO_MILVUS_URI={uri!r} is neither a Milvus server (http://host:19530) nor a Milvus Lite file: "
            f"a Milvus Lite path ends in {LITE_SUFFIX} (e.g. gallery/milvus.db)"
        )
    return path


def public_uri(uri: str) -> str:
    """The URI without credentials, fit for logs and error messages."""
    if not is_server_uri(uri):
        return uri
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


#: index build parameters by index type, and the search parameters that go with them
DEFAULT_INDEX_PARAMS: dict[str, dict[str, Any]] = {
    "HNSW": {},  # M and efConstruction come from DINO_HNSW_M / DINO_HNSW_EF_CONSTRUCTION
    "FLAT": {},
    "IVF_FLAT": {"nlist": 1024},
    "AUTOINDEX": {},
}
DEFAULT_SEARCH_PARAMS: dict[str, dict[str, Any]] = {
    "HNSW": {},  # ef comes from DINO_HNSW_EF_SEARCH (raised to k)
    "FLAT": {},
    "IVF_FLAT": {"nprobe": 16},
    "AUTOINDEX": {},
}


def index_params(index_type: str, overrides: dict[str, Any] | None, hnsw_m: int, hnsw_ef_construction: int) -> dict:
    """Build parameters of the vector index: the type's defaults, then ``overrides`` (DINO_MILVUS_INDEX_PARAMS)."""
    params = dict(DEFAULT_INDEX_PARAMS[index_type])
    if index_type == "HNSW":
        params.update(M=hnsw_m, efConstruction=hnsw_ef_construction)
    params.update(overrides or {})
    # pymilvus 3 sends these as separate keys, which a Milvus server reads; Milvus Lite 3.2 reads only a
    # "params" key and silently builds with its own defaults (HNSW M 16) without it. A server also
    # reads that legacy key, so both carry the same values.
    build = {key: value for key, value in params.items() if key != "params"}
    if build:
        params["params"] = {**build, **(params.get("params") or {})}
    return params


def search_params(index_type: str, overrides: dict[str, Any] | None, hnsw_ef_search: int, k: int) -> dict:
    """Search parameters for ``k`` results: the type's defaults, then ``overrides`` (DINO_MILVUS_SEARCH_PARAMS);
    HNSW's ef is raised to k (Milvus refuses ef < k)."""
    params = dict(DEFAULT_SEARCH_PARAMS[index_type])
    if index_type == "HNSW":
        params["ef"] = hnsw_ef_search
    params.update(overrides or {})
    if index_type == "HNSW":
        params["ef"] = max(int(params["ef"]), k)
    return {"metric_type": METRIC, "params": params}


def build_schema(client_class: Any, dim: int, identity: dict[str, str]) -> Any:
    """The collection schema (``client_class`` is pymilvus' MilvusClient, imported by the caller);
    its description also carries ``identity`` (the model properties) as JSON."""
    from pymilvus import DataType

    description = DESCRIPTION_PREFIX + json.dumps(identity, sort_keys=True)
    schema = client_class.create_schema(auto_id=False, enable_dynamic_field=False, description=description)
    schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=ID_CHARS)
    schema.add_field(VECTOR_FIELD, DataType.FLOAT_VECTOR, dim=dim)
    schema.add_field("label", DataType.VARCHAR, max_length=VARCHAR_MAX_BYTES, nullable=True)
    schema.add_field("metadata", DataType.JSON, nullable=True)
    schema.add_field(
        "image", DataType.ARRAY, element_type=DataType.VARCHAR, max_capacity=IMAGE_CHUNKS, max_length=IMAGE_CHUNK_CHARS
    )
    schema.add_field("added_at", DataType.INT64)
    return schema


def identity_from_description(description: str | None) -> dict[str, str]:
    """The model properties written into a collection's description by :func:`build_schema` ({} if none)."""
    if not description or not description.startswith(DESCRIPTION_PREFIX):
        return {}
    try:
        identity = json.loads(description[len(DESCRIPTION_PREFIX) :])
    except ValueError:
        return {}
    return {str(k): str(v) for k, v in identity.items()} if isinstance(identity, dict) else {}


def encode_image(data: bytes | None) -> list[str]:
    """The ``image`` field of a JPEG: base64 chunks ([] for no image); GalleryEntryTooLarge above the limit."""
    if not data:
        return []
    if len(data) > MAX_IMAGE_BYTES:
        raise GalleryEntryTooLarge(
            f"stored image of {len(data)} bytes: the Milvus gallery keeps images up to {MAX_IMAGE_BYTES} bytes "
            "(lower DINO_THUMBNAIL_SIZE or DINO_THUMBNAIL_QUALITY)"
        )
    text = base64.b64encode(data).decode("ascii")
    return [text[i : i + IMAGE_CHUNK_CHARS] for i in range(0, len(text), IMAGE_CHUNK_CHARS)]


def decode_image(chunks: list[str] | None) -> bytes:
    """The JPEG of an ``image`` field (b"" for none)."""
    return base64.b64decode("".join(chunks)) if chunks else b""


def check_label_and_metadata(label: str | None, metadata: dict | None) -> None:
    """GalleryEntryTooLarge when a label or metadata exceeds what a Milvus field holds."""
    if label is not None and len(label.encode("utf-8", "surrogatepass")) > VARCHAR_MAX_BYTES:
        raise GalleryEntryTooLarge(f"label longer than {VARCHAR_MAX_BYTES} bytes (the Milvus gallery's limit)")
    if (
        metadata is not None
        and len(json.dumps(metadata, ensure_ascii=False).encode("utf-8", "surrogatepass")) > MAX_METADATA_BYTES
    ):
        raise GalleryEntryTooLarge(f"metadata larger than {MAX_METADATA_BYTES} bytes (the Milvus gallery's limit)")


def image_row_bytes(chunks: list[str]) -> int:
    """Approximate bytes an image adds to an insert request (to cut large adds into several requests)."""
    return sum(len(chunk) for chunk in chunks)
