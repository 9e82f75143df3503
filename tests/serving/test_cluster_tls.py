"""Mutual TLS between cluster members, TLS on the public API, and the registration fingerprint,
over real loopback gRPC with a fake backend (no jax): `python -m dsjax.serve certs` writes a valid
chain; the cluster listener refuses, at the handshake, callers without a certificate or with one
another CA signed; a worker whose dtype or weights hash differs is refused naming both values."""

import os
import ssl
import subprocess
import sys

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from models.config import PRESETS
from models.tokenizer import ByteTokenizer
from serving.certs import make_certs
from serving.channels import InternalServer
from serving.cluster_auth import with_token
from serving.fingerprint import weights_fingerprint
from serving.proto.dsjax.v1 import dsjax_pb2 as pb
from serving.proto.dsjax.v1 import dsjax_pb2_grpc, worker_pb2_grpc
from serving.proto.dsjax.v1 import worker_pb2 as wpb
from serving.registry import Registry
from serving.router import AdminServicer, RouterServer
from serving.tls import ClusterTLS, api_server_credentials, dial
from tests.support.serving import REPO, FakeBackend

CONFIG = PRESETS["tiny-llama"]
TOKEN = "tls-tests"


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """(cluster dir, another CA's dir): two independent `certs` outputs."""
    cluster, other = tmp_path_factory.mktemp("cluster-tls"), tmp_path_factory.mktemp("other-tls")
    make_certs(cluster)
    make_certs(other)
    return cluster, other


def _load(path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_certs_command_writes_a_valid_chain_and_never_overwrites(tmp_path):
    folder = tmp_path / "tls"
    run = lambda *a: subprocess.run([sys.executable, "-m", "dsjax.serve", "certs", str(folder), *a], cwd=REPO,  # noqa: E731
                                    capture_output=True, text=True, timeout=60)
    out = run("--host", "node-7.internal", "--host", "10.1.2.3")
    assert out.returncode == 0, out.stderr
    names = ("ca.pem", "ca-key.pem", "node.pem", "node-key.pem")
    assert all(f"wrote {folder / n}" in out.stdout for n in names)
    for key in ("ca-key.pem", "node-key.pem"):
        assert (folder / key).stat().st_mode & 0o777 == 0o600
    ca, node = _load(folder / "ca.pem"), _load(folder / "node.pem")
    node.verify_directly_issued_by(ca)  # issuer name matches and the CA's key signed it
    ca.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not node.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usages = node.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= set(usages)
    san = node.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "node-7.internal"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1", "10.1.2.3"]
    assert isinstance(node.public_key(), ec.EllipticCurvePublicKey)
    before = {n: (folder / n).read_bytes() for n in names}
    again = run()
    assert again.returncode != 0 and "refusing to overwrite" in again.stderr and "--force" in again.stderr
    assert {n: (folder / n).read_bytes() for n in names} == before
    forced = run("--force")
    assert forced.returncode == 0 and (folder / "ca.pem").read_bytes() != before["ca.pem"]
    _load(folder / "node.pem").verify_directly_issued_by(_load(folder / "ca.pem"))


@pytest.fixture
def cluster_listener(certs):
    """A Registry (fingerprint: tiny-llama, block 16, float32, a known weights hash) and Admin on
    a mutual-TLS listener that also wants the cluster token."""
    registry = Registry(cluster_token=TOKEN, model="tiny-llama", block_size=16, dtype="float32", weights_hash="xxh3:right")
    server = InternalServer([(worker_pb2_grpc.add_RegistryServicer_to_server, registry),
                             (worker_pb2_grpc.add_AdminServicer_to_server, AdminServicer(FakeBackend()))],
                            host="127.0.0.1", port=0, tls=ClusterTLS.load(certs[0]), token=TOKEN).start()
    yield f"127.0.0.1:{server.port}", registry
    server.stop(0)
    registry.close()


def _admin(channel) -> wpb.InstancesResponse:
    return worker_pb2_grpc.AdminStub(channel).Instances(wpb.InstancesRequest(), timeout=5)


def test_mtls_listener_refuses_callers_without_the_cluster_certificate(certs, cluster_listener):
    target, registry = cluster_listener
    cluster, other = ClusterTLS.load(certs[0]), ClusterTLS.load(certs[1])
    strangers = {
        "plaintext": grpc.insecure_channel(target),
        "no client certificate": grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=cluster.ca)),
        "another CA's certificate": grpc.secure_channel(target, grpc.ssl_channel_credentials(
            root_certificates=cluster.ca, private_key=other.key, certificate_chain=other.cert)),
    }
    for name, channel in strangers.items():
        with with_token(channel, TOKEN) as ch:  # even with the token: no handshake, no call
            with pytest.raises(grpc.RpcError) as e:
                _admin(ch)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE, name
            with pytest.raises(grpc.RpcError):
                worker_pb2_grpc.RegistryStub(ch).Register(_info(), timeout=5)
    with dial(target, other) as ch:  # our CA does not trust the server either
        with pytest.raises(grpc.RpcError) as e:
            _admin(ch)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    with dial(target, cluster) as ch:  # the certificate alone: the token is still asked for
        with pytest.raises(grpc.RpcError) as e:
            _admin(ch)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert registry.workers() == []
    with with_token(dial(target, cluster), TOKEN) as ch:
        assert [i.worker_id for i in _admin(ch).instances] == ["fake-0"]
    with with_token(dial(f"localhost:{target.split(':')[1]}", cluster), TOKEN) as ch:  # the name localhost is in it too
        assert _admin(ch).instances


def _info(**kw) -> wpb.WorkerInfo:
    base = {"worker_id": "decode-0", "role": wpb.DECODE, "address": "127.0.0.1:1", "pid": 10, "tp": 1, "pp": 1,
            "model": "tiny-llama", "block_size": 16, "dtype": "float32", "weights_hash": "xxh3:right"}
    return wpb.WorkerInfo(**{**base, **kw})


def test_registration_refuses_another_dtype_or_other_weights(certs, cluster_listener):
    target, registry = cluster_listener
    with with_token(dial(target, ClusterTLS.load(certs[0])), TOKEN) as ch:
        stub = worker_pb2_grpc.RegistryStub(ch)
        for bad, needles in ((_info(dtype="bfloat16"), ("dtype='bfloat16'", "dtype='float32'")),
                             (_info(weights_hash="xxh3:other"), ("weights_hash='xxh3:other'", "weights_hash='xxh3:right'")),
                             (_info(weights_hash=""), ("weights_hash=''",))):
            with pytest.raises(grpc.RpcError) as e:
                stub.Register(bad, timeout=5)
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert all(n in e.value.details() for n in needles) and "decode-0" in e.value.details(), e.value.details()
        assert registry.workers() == []
        assert stub.Register(_info(), timeout=5).heartbeat_seconds > 0
        assert [w.id for w in registry.workers()] == ["decode-0"]


def test_a_router_without_the_weights_pins_the_first_workers_hash():
    registry = Registry(model="tiny-llama", dtype="float32", pin=("weights_hash",))
    try:
        class Ctx:
            def abort(self, code, message):
                raise RuntimeError(code, message)

        registry.Register(_info(worker_id="prefill-0", weights_hash="xxh3:first"), Ctx())
        with pytest.raises(RuntimeError, match="weights_hash='xxh3:second'.*weights_hash='xxh3:first'"):
            registry.Register(_info(weights_hash="xxh3:second"), Ctx())
        registry.Register(_info(weights_hash="xxh3:first"), Ctx())
        assert sorted(w.id for w in registry.workers()) == ["decode-0", "prefill-0"]
    finally:
        registry.close()


def test_weights_fingerprint(tmp_path):
    from safetensors.numpy import save_file

    dummy = weights_fingerprint("tiny-llama", dummy_weights=True, seed=0)
    assert dummy.startswith("xxh3:") and dummy == weights_fingerprint("tiny-llama", dummy_weights=False, seed=0)
    assert dummy != weights_fingerprint("tiny-llama", dummy_weights=True, seed=1)
    assert dummy != weights_fingerprint("small-llama", dummy_weights=True, seed=0)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text('{"model_type": "llama"}')
    assert weights_fingerprint(str(ckpt), dummy_weights=False) is None  # no weights here: the router pins
    rng = np.random.default_rng(0)
    tensors = {"a": rng.standard_normal((64, 64)).astype(np.float32), "b": rng.standard_normal((4096,)).astype(np.float32)}
    save_file(tensors, str(ckpt / "model.safetensors"))
    real = weights_fingerprint(str(ckpt), dummy_weights=False)
    assert real.startswith("xxh3:") and real == weights_fingerprint(str(ckpt), dummy_weights=False)
    changed = dict(tensors, b=tensors["b"].copy())
    changed["b"][-1] += 1.0  # one value, in the last sample
    save_file(changed, str(ckpt / "model.safetensors"))
    assert weights_fingerprint(str(ckpt), dummy_weights=False) not in (real, None)
    save_file({**tensors, "b": tensors["b"].astype(np.float16)}, str(ckpt / "model.safetensors"))
    assert weights_fingerprint(str(ckpt), dummy_weights=False) != real  # another dtype in the header


def test_public_grpc_tls_and_the_client_flag(certs):
    """--api-tls-cert on the public port (server-only TLS): a client trusting its CA streams, and
    `python -m dsjax.client --tls-ca` too; a plaintext client gets nowhere."""
    api = certs[1]  # any certificate will do for the public API; here the "other" CA's node certificate
    router = RouterServer(FakeBackend(), ByteTokenizer(CONFIG.vocab_size), CONFIG, port=0, host="127.0.0.1",
                          credentials=api_server_credentials(str(api / "node.pem"), str(api / "node-key.pem"))).start()
    target = f"localhost:{router.port}"
    req = pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(max_tokens=3))
    try:
        creds = grpc.ssl_channel_credentials(root_certificates=(api / "ca.pem").read_bytes())  # no client certificate
        with grpc.secure_channel(target, creds) as ch:
            assert sum(len(m.token_ids) for m in dsjax_pb2_grpc.GenerationStub(ch).Generate(req, timeout=10)) == 3
        with grpc.insecure_channel(target) as ch:
            with pytest.raises(grpc.RpcError) as e:
                list(dsjax_pb2_grpc.GenerationStub(ch).Generate(req, timeout=5))
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        env = dict(os.environ, PYTHONPATH=str(REPO))
        out = subprocess.run([sys.executable, "-m", "dsjax.client", "--target", target, "--tls-ca", str(api / "ca.pem"),
                              "--token-ids", "1,2", "--max-tokens", "4", "--show-tokens"],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "[LENGTH] 4 tokens" in out.stderr and "token_ids: [3, 4, 5, 6]" in out.stderr, out.stderr
        wrong = subprocess.run([sys.executable, "-m", "dsjax.client", "--target", target, "--tls-ca", str(certs[0] / "ca.pem"),
                                "hi", "--timeout", "5"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert wrong.returncode == 1 and "UNAVAILABLE" in wrong.stderr
    finally:
        router.stop(0)


def test_https_api_with_the_openai_client(certs):
    import httpx2
    import openai

    from serving.generation import Generation
    from serving.http_server import HttpServer, OpenAIApp

    api = certs[1]
    backend = FakeBackend()
    generation = Generation(backend, ByteTokenizer(CONFIG.vocab_size), CONFIG)
    app = OpenAIApp(generation, model_names=["tiny-llama"], ready=backend.ready, metrics_text=lambda: b"")
    server = HttpServer(app, host="127.0.0.1", port=0, ssl_certfile=str(api / "node.pem"), ssl_keyfile=str(api / "node-key.pem")).start()
    try:
        trust = ssl.create_default_context(cafile=str(api / "ca.pem"))
        client = openai.OpenAI(base_url=f"https://localhost:{server.port}/v1", api_key="unused", max_retries=3, timeout=20,
                               http_client=httpx2.Client(verify=trust))
        out = client.completions.create(model="tiny-llama", prompt="hi", max_tokens=5)
        assert out.usage.completion_tokens == 5
        chunks = list(client.completions.create(model="tiny-llama", prompt="hi", max_tokens=4, stream=True))
        assert sum(1 for c in chunks if c.choices and c.choices[0].text is not None) >= 1
        untrusting = openai.OpenAI(base_url=f"https://localhost:{server.port}/v1", api_key="unused", max_retries=0, timeout=5,
                                   http_client=httpx2.Client(verify=ssl.create_default_context(cafile=str(certs[0] / "ca.pem"))))
        with pytest.raises(openai.APIConnectionError):
            untrusting.models.list()
    finally:
        server.stop()
