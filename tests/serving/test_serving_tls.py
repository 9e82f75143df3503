"""A whole cluster with TLS everywhere, in this process over loopback gRPC: the router's fronts as
`python -m dsjax.serve --tls-dir D --api-tls-cert C --api-tls-key K` builds them (public Generate
and the OpenAI API over TLS, the Registry and Admin on their own mutual-TLS listener), a real
prefill and a real decode worker (tiny-llama, dummy weights) registering over mutual TLS, the KV
pulled from prefill to decode over mutual TLS."""

import os
import ssl
import subprocess
import sys
import threading

import grpc
import pytest

from dsjax.runtime.kv_cache import CacheConfig
from models.config import PRESETS
from serving.certs import make_certs
from serving.cluster_auth import with_token
from serving.fingerprint import weights_fingerprint
from serving.launcher import _Fronts, _worker_argv, cluster_registry
from serving.proto.dsjax.v1 import dsjax_pb2 as pb
from serving.proto.dsjax.v1 import dsjax_pb2_grpc, worker_pb2_grpc
from serving.proto.dsjax.v1 import worker_pb2 as wpb
from serving.remote import RemoteBackend
from serving.tls import ClusterTLS, dial
from serving.worker import WorkerConfig, WorkerProcess
from tests.support.serving import REPO

TOKEN = "tls-cluster-tests"
PROMPT = [256, 72, 105, 33, 9]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from dsjax.serve import parse_args

    cluster_dir, api_dir = tmp_path_factory.mktemp("cluster-tls"), tmp_path_factory.mktemp("api-tls")
    make_certs(cluster_dir)
    make_certs(api_dir)  # the public API's own certificate, from another CA
    args = parse_args(["--workers", "processes", "--model", "tiny-llama", "--port", "0", "--http-port", "-1",
                       "--metrics-port", "-1", "--tls-dir", str(cluster_dir), "--cluster-port", "0",
                       "--api-tls-cert", str(api_dir / "node.pem"), "--api-tls-key", str(api_dir / "node-key.pem")])
    registry = cluster_registry(args, TOKEN)
    backend = RemoteBackend(registry)
    fronts = _Fronts(args, backend, PRESETS["tiny-llama"], [(worker_pb2_grpc.add_RegistryServicer_to_server, registry)],
                     cluster_token=TOKEN)
    workers, threads = [], []
    try:
        for role in ("prefill", "decode"):
            cfg = WorkerConfig(role=role, worker_id=f"{role}-0", router=f"127.0.0.1:{fronts.cluster_port}", model="tiny-llama",
                               dummy_weights=True, cache=CacheConfig(num_blocks=48), warmup=False, cluster_token=TOKEN,
                               tls_dir=str(cluster_dir))
            workers.append(WorkerProcess(cfg))
            threads.append(threading.Thread(target=workers[-1].serve, name=f"serve-{role}", daemon=True))
            threads[-1].start()
        assert registry.wait_for(wpb.PREFILL, 1, 30) and registry.wait_for(wpb.DECODE, 1, 30)
        yield fronts, registry, workers, cluster_dir, api_dir
    finally:
        fronts.close()
        for w in workers:
            w.request_stop()
        for t in threads:
            t.join(10)
        backend.close()


def _public(fronts, api_dir) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(root_certificates=(api_dir / "ca.pem").read_bytes())
    return grpc.secure_channel(f"localhost:{fronts.router.port}", creds)


def _generate(channel, max_tokens=6) -> tuple[list[int], list]:
    req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=PROMPT),
                             sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    msgs = list(dsjax_pb2_grpc.GenerationStub(channel).Generate(req, timeout=60))
    return [t for m in msgs for t in m.token_ids], msgs


def test_generate_end_to_end_over_tls(cluster):
    fronts, registry, _, cluster_dir, api_dir = cluster
    with _public(fronts, api_dir) as ch:
        ids, msgs = _generate(ch)
    assert len(ids) == 6 and msgs[-1].finish_reason == pb.LENGTH
    assert msgs[-1].breakdown.kv_bytes > 0  # the decode worker pulled the KV from the prefill worker (mutual TLS)
    infos = {w.id: w.info for w in registry.workers()}
    want = weights_fingerprint("tiny-llama", dummy_weights=True, seed=0)
    assert {(i.dtype, i.weights_hash) for i in infos.values()} == {("float32", want)}
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-m", "dsjax.client", "--target", f"localhost:{fronts.router.port}",
                          "--tls-ca", str(api_dir / "ca.pem"), "--token-ids", ",".join(map(str, PROMPT)), "--max-tokens", "6",
                          "--temperature", "0", "--ignore-eos", "--show-tokens"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and f"token_ids: {ids}" in out.stderr, out.stderr
    with with_token(dial(f"127.0.0.1:{fronts.cluster_port}", ClusterTLS.load(cluster_dir)), TOKEN) as ch:
        stats = worker_pb2_grpc.AdminStub(ch).Instances(wpb.InstancesRequest(), timeout=10).instances
    assert {s.worker_id for s in stats} == {"prefill-0", "decode-0"} and all(s.alive for s in stats)
    assert sum(s.migrations for s in stats if s.role == wpb.DECODE) >= 1


def test_https_api_gives_the_grpc_tokens(cluster):
    import httpx2
    import openai

    fronts, _, _, _, api_dir = cluster
    with _public(fronts, api_dir) as ch:
        ids, _ = _generate(ch, max_tokens=5)
    client = openai.OpenAI(base_url=f"https://localhost:{fronts.http.port}/v1", api_key="unused", max_retries=3, timeout=60,
                           http_client=httpx2.Client(verify=ssl.create_default_context(cafile=str(api_dir / "ca.pem"))))
    out = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=5, temperature=0,
                                    extra_body={"ignore_eos": True, "return_token_ids": True})
    assert out.usage.completion_tokens == 5
    assert out.choices[0].model_extra["token_ids"] == ids


def test_internal_services_are_off_the_public_port_and_refuse_strangers(cluster):
    fronts, registry, workers, cluster_dir, api_dir = cluster
    with with_token(_public(fronts, api_dir), TOKEN) as ch:  # Registry and Admin are not served there at all
        for call in (lambda: worker_pb2_grpc.AdminStub(ch).Instances(wpb.InstancesRequest(), timeout=5),
                     lambda: worker_pb2_grpc.RegistryStub(ch).Register(workers[0].info, timeout=5)):
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    before = {w.id: w.info.pid for w in registry.workers()}
    other = ClusterTLS.load(api_dir)  # certificates a different CA signed
    for target in (f"127.0.0.1:{fronts.cluster_port}", workers[0].address, workers[1].address):
        for channel in (grpc.insecure_channel(target), dial(target, other),
                        grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=other.ca))):
            with with_token(channel, TOKEN) as ch:
                with pytest.raises(grpc.RpcError) as e:
                    worker_pb2_grpc.WorkerStub(ch).Stats(wpb.StatsRequest(), timeout=5)
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE, target
    with with_token(dial(workers[0].address, ClusterTLS.load(cluster_dir)), TOKEN) as ch:  # a cluster member gets in
        assert worker_pb2_grpc.WorkerStub(ch).Stats(wpb.StatsRequest(), timeout=5).worker_id == "prefill-0"
    assert {w.id: w.info.pid for w in registry.workers()} == before


def test_processes_mode_passes_the_tls_dir_to_the_workers():
    from dsjax.serve import parse_args

    args = parse_args(["--workers", "processes", "--tls-dir", "rel/tls"])
    argv = _worker_argv(args, "decode", "decode-0", "127.0.0.1:50052")
    assert parse_args(argv).tls_dir == os.path.abspath("rel/tls")
    assert "--tls-dir" not in _worker_argv(parse_args(["--workers", "processes", "--tls-dir", ""]), "decode", "d", "x:1")


def test_processes_mode_cluster_with_tls(tmp_path):
    """`python -m dsjax.serve --workers processes --tls-dir D`: the launcher's worker processes
    register on the mutual-TLS cluster port and serve a Generate."""
    from tests.support.serving import free_port, instances_over, launch_server, stop_server, wait_serving

    make_certs(tmp_path / "tls")
    port, cluster_port = free_port(), free_port()
    proc = launch_server(["--workers", "processes", "--model", "tiny-llama", "--port", str(port), "--cluster-port", str(cluster_port),
                          "--http-port", "0", "--metrics-port", "-1", "--tls-dir", str(tmp_path / "tls"), "--num-blocks", "48",
                          "--no-warmup", "--compilation-cache", os.path.expanduser("~/.cache/dsjax/jax-tests")],
                         tmp_path / "serve.log")
    try:
        wait_serving(f"127.0.0.1:{port}", timeout=90, proc=proc)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:  # no --api-tls-cert: the public port stays plaintext
            ids, msgs = _generate(ch, max_tokens=4)
        assert len(ids) == 4 and msgs[-1].breakdown.kv_bytes > 0
        stats = instances_over(f"127.0.0.1:{cluster_port}", ClusterTLS.load(tmp_path / "tls"))
        assert {s.worker_id for s in stats} == {"prefill-0", "decode-0"}
    finally:
        stop_server(proc)
    assert proc.returncode == 0, (tmp_path / "serve.log").read_text()[-3000:]
