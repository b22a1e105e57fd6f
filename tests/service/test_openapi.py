"""The OpenAPI document says exactly what the server does (service.openapi), and POST /v1/embeddings
speaks OpenAI's embeddings API, checked with the official ``openai`` client against a real server.
The fuzzing of the whole contract is ``make contract`` (tests/contract/run_schemathesis.py)."""

from __future__ import annotations

import base64
import re

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import ServiceSettings
from tests.helpers import ServerProcess
from tests.service.images import multipart, photo_bytes

API_KEY = "openapi-test-key"
MAX_IMAGES = 5
MAX_K = 50
MAX_PAGE = 40
NUM_HEADS = 3  # the test model (vit_tiny)
ID_ROUTES = {"index_image", "attention_of_stored", "neighbors_of_stored", "index_delete"}
PUBLIC = {"healthz", "readyz"}


def settings(model_dir, **overrides) -> ServiceSettings:
    values = dict(
        model_dir=model_dir,
        max_images_per_request=MAX_IMAGES,
        max_neighbors=MAX_K,
        max_page_size=MAX_PAGE,
        warmup_batches=0,
    )
    return ServiceSettings(**{**values, **overrides})


@pytest.fixture(scope="module")
def client(model_dir):
    with TestClient(create_app(settings(model_dir))) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def keyed_client(model_dir):
    with TestClient(create_app(settings(model_dir, api_key=API_KEY))) as test_client:
        test_client.headers["Authorization"] = f"Bearer {API_KEY}"
        yield test_client


def operations(document: dict) -> dict[str, tuple[str, str, dict]]:
    """operationId -> (method, path, operation)."""
    return {
        op["operationId"]: (method, path, op) for path, item in document["paths"].items() for method, op in item.items()
    }


def test_every_error_is_one_string_detail_schema(client):
    document = client.get("/openapi.json").json()
    schemas = document["components"]["schemas"]
    assert "HTTPValidationError" not in schemas and "ValidationError" not in schemas
    assert schemas["ErrorResponse"]["properties"]["detail"]["type"] == "string"
    openai_error = schemas["OpenAIErrorResponse"]
    assert openai_error["properties"]["detail"]["type"] == "string" and "error" in openai_error["required"]
    for operation_id, (_, path, op) in operations(document).items():
        for status, response in op["responses"].items():
            if int(status) >= 400:
                ref = response["content"]["application/json"]["schema"]["$ref"]
                expected = "OpenAIErrorResponse" if path.startswith("/v1/") else "ErrorResponse"
                assert ref == f"#/components/schemas/{expected}", (operation_id, status)
    # and the answers are that: a FastAPI validation error, a 404 route, a 405
    for response in (
        client.get("/neighbors/" + "a" * 32, params={"k": 0}),
        client.get("/index/items", params={"limit": "many"}),
        client.get("/no-such-route"),
        client.put("/embed"),
    ):
        assert response.status_code in (404, 405, 422) and isinstance(response.json()["detail"], str), response.text
    assert client.get("/index/items", params={"limit": "many"}).json()["detail"].startswith("query parameter 'limit'")


def test_status_codes_per_route(client):
    ops = operations(client.get("/openapi.json").json())
    statuses = {name: set(map(int, op["responses"])) for name, (_, _, op) in ops.items()}
    assert {400, 408, 413, 415, 422, 503} <= statuses["embed"] and 409 not in statuses["embed"]
    assert {404, 409, 503} <= statuses["index_delete"] and 413 not in statuses["index_delete"]
    assert 409 in statuses["index_add"] and 404 in statuses["embeddings_openai"]
    assert statuses["healthz"] == {200} and statuses["readyz"] == {200, 503}
    assert all(401 not in codes for codes in statuses.values())


def test_security_only_with_a_key(client, keyed_client):
    open_document = client.get("/openapi.json").json()
    assert "securitySchemes" not in open_document.get("components", {})
    assert all("security" not in op for _, _, op in operations(open_document).values())

    keyed = keyed_client.get("/openapi.json").json()
    assert keyed["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    for name, (_, _, op) in operations(keyed).items():
        if name in PUBLIC:
            assert "security" not in op and 401 not in map(int, op["responses"])
        else:
            assert op["security"] == [{"HTTPBearer": []}] and "401" in op["responses"], name


def test_limits_are_schema_constraints(client):
    ops = operations(client.get("/openapi.json").json())

    def parameter(operation_id: str, name: str) -> dict:
        return next(p["schema"] for p in ops[operation_id][2]["parameters"] if p["name"] == name)

    assert parameter("neighbors", "k")["maximum"] == MAX_K and parameter("neighbors_of_stored", "k")["minimum"] == 1
    assert parameter("index_items", "limit")["maximum"] == MAX_PAGE
    head = parameter("attention", "head")["pattern"]
    assert [v for v in ["mean", "0", "2", "3", "01", "x"] if re.match(head, v)] == ["mean", "0", "2"]
    for operation_id, most in (("embed", MAX_IMAGES), ("index_add", MAX_IMAGES), ("attention", 1), ("neighbors", 1)):
        for media in ("multipart/form-data", "application/json"):
            images = ops[operation_id][2]["requestBody"]["content"][media]["schema"]["properties"]["images"]
            assert (images["minItems"], images["maxItems"]) == (1, most), (operation_id, media)
    # the documented bound is the enforced one
    assert client.post("/neighbors", params={"k": MAX_K + 1}, files=multipart(photo_bytes())).status_code == 422
    assert client.post("/neighbors", params={"k": MAX_K}, files=multipart(photo_bytes())).status_code == 200
    assert client.post("/attention", params={"head": NUM_HEADS}, files=multipart(photo_bytes())).status_code == 422


def test_links_from_an_add_lead_to_the_routes_of_its_id(client):
    ops = operations(client.get("/openapi.json").json())
    links = ops["index_add"][2]["responses"]["200"]["links"]
    assert {link["operationId"] for link in links.values()} == ID_ROUTES
    added = client.post("/index", files=multipart(photo_bytes())).json()
    for link in links.values():
        method, path, _ = ops[link["operationId"]]
        assert link["parameters"] == {"image_id": "$response.body#/ids/0"}
        url = path.replace("{image_id}", added["ids"][0])
        assert client.request(method.upper(), url).status_code == 200, (method, url)


def test_405_allows_every_method_of_the_path(client):
    cases = {
        ("DELETE", "/index"): "GET, POST",  # two routes share the path: Starlette alone says "POST"
        ("PUT", "/healthz"): "GET, HEAD",
        ("DELETE", "/index/items"): "GET",  # not taken for DELETE /index/{image_id}
        ("PATCH", "/index/" + "b" * 32): "DELETE",
        ("GET", "/embed"): "POST",
    }
    for (method, path), allowed in cases.items():
        response = client.request(method, path)
        assert response.status_code == 405 and response.headers["allow"] == allowed, (method, path, response.headers)
    # an id that is not one does not reach the routes of an id
    assert client.get("/index/items/image").status_code == 404


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("openai") / "server.log"
    env = {"DINO_MAX_IMAGES_PER_REQUEST": str(MAX_IMAGES), "DINO_API_KEY": API_KEY, "DINO_INDEX_DIR": None}
    with ServerProcess(model_dir, log, env=env) as process:
        yield process


def data_url(data: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(data).decode()


def test_openai_client_gets_the_embeddings_of_post_embed(server):
    openai = pytest.importorskip("openai")
    model = server.ready["model"]
    images = [photo_bytes(0), photo_bytes(3)]
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)
    floats = client.embeddings.create(model=model, input=[data_url(d) for d in images], encoding_format="float")
    # the client's default asks for base64 and decodes it to floats
    decoded = client.embeddings.create(model=model, input=[data_url(d) for d in images])
    single = client.embeddings.create(model=model, input=base64.b64encode(images[1]).decode())

    import httpx

    reference = httpx.post(
        f"{server.url}/embed",
        files=[("images", ("a.jpg", d, "image/jpeg")) for d in images],
        headers={"Authorization": f"Bearer {API_KEY}"},
    ).json()["embeddings"]
    assert floats.model == model and [d.index for d in floats.data] == [0, 1]
    assert floats.usage.prompt_tokens == floats.usage.total_tokens > 0
    for answer in (floats, decoded):
        got = np.asarray([d.embedding for d in answer.data], dtype=np.float32)
        assert np.abs(got - np.asarray(reference, dtype=np.float32)).max() < 1e-6
    assert np.abs(np.asarray(single.data[0].embedding) - np.asarray(reference[1])).max() < 1e-6


def test_openai_client_errors(server):
    openai = pytest.importorskip("openai")
    image = data_url(photo_bytes(0))
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.embeddings.create(model="text-embedding-3-small", input=[image])
    with pytest.raises(openai.UnprocessableEntityError, match="dimensions must be"):
        client.embeddings.create(model=server.ready["model"], input=[image], dimensions=7)
    with pytest.raises(openai.APIStatusError, match="too many images") as too_many:
        client.embeddings.create(model=server.ready["model"], input=[image] * (MAX_IMAGES + 1))
    assert too_many.value.status_code == 413
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).embeddings.create(
            model=server.ready["model"], input=[image]
        )
    with pytest.raises(openai.UnprocessableEntityError, match="not valid base64"):
        client.embeddings.create(model=server.ready["model"], input=["not an image!"])
