"""A checkpoint loads without `import hope` (bug 8 of issue 12): save_pretrained writes the modeling code next to
the weights (hope.remote_code), and `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` runs it
in a clean subprocess in which the hope and hope_kernels packages cannot even be imported."""
from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from hope.remote_code import AUTO_MAP, PACKAGES, BundleError, _rewrite, flat_name, remote_code_files
from tests.hope.utils_hope import random_ids, tiny_config, tiny_model

# One subprocess (each load costs seconds): the deep memory reaches the most bundled files (both Titans ops and the
# CMS); every layer file is imported by modeling_hope anyway. The lazily imported Triton kernels are run on the
# checkpoint whose every op has one and that reaches every kernel: the deep Titans memory (its kernels import the
# linear op's) with learning CMS levels.
CONFIGS = {"deep_titans": dict(memory_depth=2, momentum=False, cms_variant="independent", tie_word_embeddings=False),
           "hope_attention": dict(mixer="attention")}
TRITON_CONFIGS = ["deep_titans"]

# Runs in the subprocess: any import of hope or hope_kernels fails, so the checkpoint's own files must do it all.
CLIENT = textwrap.dedent('''
    import importlib.abc, json, sys

    class Blocked(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("hope", "hope_kernels"):
                raise ModuleNotFoundError(f"the test forbids importing {name}")

    sys.meta_path.insert(0, Blocked())
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    ids = torch.tensor(json.loads(sys.argv[1]))
    results = {}
    triton_paths = json.loads(sys.argv[2])
    for path in sys.argv[3:]:
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float64).eval()
        with torch.no_grad():
            logits = model(ids).logits
            generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                                       pad_token_id=0, eos_token_id=None)
        resaved = path + "-resaved"
        model.save_pretrained(resaved)  # transformers copies the loaded code along
        again = AutoModelForCausalLM.from_pretrained(resaved, trust_remote_code=True, dtype=torch.float64).eval()
        with torch.no_grad():
            results[path] = dict(
                logits=logits.tolist(), generated=generated.tolist(), resaved=again(ids).logits.tolist(),
                module=type(model).__module__,
                config=type(AutoConfig.from_pretrained(path, trust_remote_code=True)).__module__,
            )
            if path in triton_paths:
                kernels = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32,
                                                               kernel_backend="triton").eval()
                results[path]["triton"] = kernels(ids[:, :6]).logits.tolist()
    results["imported"] = sorted({name.split(".")[0] for name in sys.modules} & {"hope", "hope_kernels"})
    print("RESULT " + json.dumps(results))
''')


def test_checkpoint_loads_in_a_process_without_the_package(tmp_path):
    ids = random_ids(2, 9)
    expected = {}
    for name, overrides in CONFIGS.items():
        model = tiny_model(tiny_config(**overrides))
        model.save_pretrained(tmp_path / name)
        config = json.loads((tmp_path / name / "config.json").read_text())
        assert config["auto_map"] == AUTO_MAP
        with torch.no_grad():
            expected[name] = (model(ids).logits, model.float()(ids[:, :6]).logits)
        expected[name] += (model.double().generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3,
                                                   do_sample=False, pad_token_id=0, eos_token_id=None),)
    client = tmp_path / "client.py"
    client.write_text(CLIENT)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTHON", "HF_MODULES"))}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"), OMP_NUM_THREADS="1", TRITON_INTERPRET="1")
    paths = [str(tmp_path / name) for name in CONFIGS]
    triton_paths = [str(tmp_path / name) for name in TRITON_CONFIGS]
    done = subprocess.run([sys.executable, str(client), json.dumps(ids.tolist()), json.dumps(triton_paths), *paths],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.split("RESULT ", 1)[1])
    assert results.pop("imported") == []
    for name, path in zip(CONFIGS, paths):
        result = results[path]
        assert result["module"].startswith("transformers_modules.") and result["module"].endswith(".modeling_hope")
        assert result["config"].startswith("transformers_modules.")
        logits, fp32_logits, generated = expected[name]
        assert torch.equal(torch.tensor(result["logits"], dtype=torch.float64), logits)
        assert torch.equal(torch.tensor(result["resaved"], dtype=torch.float64), logits)
        assert torch.equal(torch.tensor(result["generated"]), generated)
        # The Triton kernels (imported lazily by the bundled op) run in the interpreter, and agree with the reference
        # (6 tokens: the CMS level of chunk size 5 updates once, so the chunk kernels run, not just the plain FFN).
        if name in TRITON_CONFIGS:
            assert (torch.tensor(result["triton"]) - fp32_logits).abs().max() < 1e-3


def test_the_bundle_is_the_current_source_with_flat_imports():
    """Each bundled file is its module's source as imported now, with only the imports of the two packages
    rewritten (so a change to the package is in the next checkpoint); nothing in it imports them any more."""
    files = remote_code_files()
    assert {"modeling_hope.py", "configuration_hope.py", "cache_hope.py", "layers_titans_mixer.py",
            "hope_kernels_cms_reference.py", "hope_kernels_deep_titans_reference.py", "hope_kernels_cms_chunk.py",
            "hope_kernels_cms_step.py", "hope_kernels_cms__common.py", "hope_kernels_titans_chunk.py",
            "hope_kernels_deep_titans_chunk.py", "hope_kernels_deep_titans_step.py"} <= set(files)
    for name, source in files.items():
        header, body = source.split("\n", 1)
        module = header.split(" from ", 1)[1].split(":", 1)[0]
        assert flat_name(module) + ".py" == name
        original = Path(sys.modules[module].__file__).read_text() if module in sys.modules else None
        # transformers finds the files to copy with this pattern on the raw text (get_relative_imports).
        for relative in re.findall(r"^\s*from\s+\.(\S+)\s+import", body, flags=re.MULTILINE):
            assert f"{relative}.py" in files, f"{name}: the loader would look for {relative}.py"
        for node in ast.walk(ast.parse(body)):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                assert node.module.split(".")[0] not in PACKAGES, f"{name} still imports {node.module}"
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                assert f"{node.module}.py" in files, f"{name} imports {node.module}, which is not bundled"
        if original is not None:
            kept = [line for line in body.splitlines() if not line.lstrip().startswith("from .")]
            source_lines = [line for line in original.splitlines()
                            if not line.lstrip().startswith(("from .", "from hope", "from hope_kernels"))]
            assert [line for line in kept if line not in source_lines] == [], name


def test_save_pretrained_with_push_to_hub_uploads_the_code_too(tmp_path, monkeypatch):
    """The upload inside transformers' save_pretrained only sends files written after it started; Hope saves
    first and then calls push_to_hub, which saves into a fresh folder and uploads all of it (offline: recorded)."""
    from hope import HopeForCausalLM

    pushed = []
    monkeypatch.setattr(HopeForCausalLM, "push_to_hub", lambda self, repo_id, **kwargs: pushed.append((repo_id, kwargs)))
    model = tiny_model(tiny_config(momentum=False))
    model.save_pretrained(tmp_path / "local", push_to_hub=True, repo_id="someone/hope-tiny", commit_message="hi")
    assert pushed == [("someone/hope-tiny", {"token": None, "commit_message": "hi"})]
    assert (tmp_path / "local" / "modeling_hope.py").is_file() and (tmp_path / "local" / "model.safetensors").is_file()


@pytest.mark.parametrize("line", ["import hope.cache_hope", "from hope_kernels import titans"])
def test_an_import_the_bundle_cannot_flatten_raises(tmp_path, line):
    """`import pkg.mod` binds the package and `from pkg import submodule` imports a module by a name: neither has a
    faithful flat relative form, so the bundle refuses them (naming the module and the import) instead of writing a
    checkpoint whose code fails to load elsewhere."""
    source = tmp_path / "bad.py"
    source.write_text(line + "\n")
    with pytest.raises(BundleError, match=re.escape(line.split()[-1])):
        _rewrite("hope.bad", source, False, (0, 0))
