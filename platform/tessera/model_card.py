"""The model card: README.md in a bundle, for whoever picks the bundle up — what it was trained on,
how big it is, how far it trained, how well it did, what it is for and not for, its license —
with the same facts as YAML front matter for tools (the layout of Hugging Face model cards).

    write_card(cfg, manifest)      jobs/export.py, after the bundle is written
    add_evaluation(uri, report)    the evaluate job, on the run's own bundle
    summary(bundle)                what GET /v1/models/{id} returns (no URIs, nothing internal)

The card is not in the manifest's file list: it describes the bundle and may be rewritten (new
evaluation figures) without touching the digests that loading checks.
"""

from __future__ import annotations

import json
import logging
import struct

import yaml

from tessera import published, storage

log = logging.getLogger("tessera.model_card")

README = "README.md"
DEFAULT_USE = ("Research, teaching and demos of text-to-image generation within the domain of its "
               "training data. Not for images of real people, nor for any use where its pictures "
               "would be taken as fact.")


def _parameters(uri: str, weights: str, options) -> int | None:
    """Parameters in a safetensors file, from its header alone (8-byte length, then JSON)."""
    try:
        fs, path = storage.resolve(storage.join(uri, weights), options)
        with fs.open_input_file(path) as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error):
        return None
    total = 0
    for name, t in header.items():
        if name != "__metadata__":
            count = 1
            for d in t["shape"]:
                count *= d
            total += count
    return total


def _vocab_size(uri: str, options) -> int:
    from tessera.data.tokenizer import CaptionTokenizer

    return CaptionTokenizer.from_json(storage.read_bytes(storage.join(uri, "tokenizer.json"), options)
                                      .decode()).vocab_size


def _data_facts(tokens: dict, options) -> dict:
    """The prepared dataset behind the prior's tokens, from its manifest (where still readable)."""
    data_uri = (tokens.get("data") or {}).get("uri")
    out: dict = {"uri": data_uri, "generation": (tokens.get("data") or {}).get("generation"),
                 "token_rows": tokens.get("num_samples"), "views": tokens.get("views")}
    if not data_uri:
        return out | {"unavailable": "the prior's export records no dataset"}
    try:
        m = storage.read_json(storage.join(data_uri, published.MANIFEST), options)
    except (storage.StorageError, OSError, ValueError) as e:
        return out | {"unavailable": f"its manifest could not be read ({str(e)[:200]})"}
    source = m.get("source") or {}
    return out | {"source": source.get("kind"), "source_uri": source.get("uri"),
                  "source_files": source.get("num_files"), "input_samples": m.get("input_samples"),
                  "kept_samples": m.get("kept_samples"),
                  "skipped": {k: v for k, v in (m.get("skipped") or {}).items() if v},
                  "splits": {k: v.get("num_samples") for k, v in (m.get("splits") or {}).items()},
                  "resolution": m.get("resolution")}


def evaluation_facts(report: dict, report_uri: str) -> dict:
    """The headline figures of an evaluation report (report.json)."""
    d, p = report.get("dvae") or {}, report.get("prior") or {}
    out = {"created": report.get("created"), "report": report_uri,
           "val_images": d.get("images"), "dvae_psnr_db": d.get("psnr_db"),
           "dvae_codebook_usage": d.get("codebook_usage"),
           "prior_val_image_loss_nats": p.get("val_image_loss"),
           "prior_val_image_bits_per_token": p.get("val_image_bits_per_token")}
    accuracy = {name: {"captions": s.get("captions"),
                       "without_reranking": s["without_reranking"]["caption_accuracy"],
                       "with_reranking": s["with_reranking"]["caption_accuracy"]}
                for name, s in (report.get("splits") or {}).items() if "with_reranking" in s}
    if accuracy:  # shapes data: the attribute classifier's reading of the drawn images
        out["caption_accuracy"] = accuracy
    return out


def build_facts(cfg, manifest: dict, bundle_uri: str, options=None) -> dict:
    """Everything the card states, from the bundle (manifest, prior.json), the dataset manifest
    its tokens came from, the run's evaluation report when it is of this bundle, and export.card."""
    parts = manifest["parts"]
    prior_meta = storage.read_json(storage.join(bundle_uri, "prior.json"), options)
    tokens = prior_meta.get("tokens") or {}
    params = {p: m.get("num_parameters") or _parameters(bundle_uri, f"{p}.safetensors", options)
              for p, m in parts.items()}
    card = cfg.export.card
    facts = {
        "name": manifest["name"], "created": manifest["created"],
        "code_version": manifest.get("code_version"),
        "run": (manifest.get("sources") or {}).get("run"),
        "resolution": manifest["resolution"], "text_len": manifest["text_len"],
        "grid": parts["dvae"]["shape"].get("grid_size"), "codebook": parts["dvae"]["shape"].get("num_tokens"),
        "tokenizer": {"vocab_size": tokens.get("text_vocab_size") or _vocab_size(bundle_uri, options),
                      "max_tokens": manifest["text_len"]},
        "parts": {p: {"parameters": params[p], "steps": m.get("step"), "weights": m.get("weights"),
                      "shape": m.get("shape")} for p, m in parts.items()},
        "parameters": sum(n for n in params.values() if n) or None,
        "data": _data_facts(tokens, options),
        "evaluation": None,
        "license": {"license": card.license, "license_name": card.license_name,
                    "license_link": card.license_link},
        "intended_use": card.intended_use or DEFAULT_USE,
        "limitations": list(card.limitations),
    }
    report_uri = storage.join(cfg.paths.eval, "report.json")
    try:
        report = storage.read_json(report_uri, options) if storage.exists(report_uri, options) else None
    except (storage.StorageError, ValueError):
        report = None
    # A report of this very bundle: same place, written after this export.
    if (report and storage.absolute(str((report.get("bundle") or {}).get("uri", ""))).rstrip("/")
            == storage.absolute(bundle_uri).rstrip("/") and report.get("created", "") >= manifest["created"]):
        facts["evaluation"] = evaluation_facts(report, report_uri)
    return facts


def _limitations(f: dict) -> list[str]:
    """What the card says the model cannot do, worked out from its facts, then export.card's."""
    out = []
    if f["data"].get("source") == "shapes":
        out.append("Trained on tessera's procedural shapes (one to three coloured shapes on a plain "
                   "background): it draws nothing else, whatever the prompt.")
    out.append(f"Images are {f['resolution']}×{f['resolution']} px, drawn as a {f['grid']}×{f['grid']} "
               f"grid of {f['codebook']} codes: fine detail and text in images are beyond it.")
    out.append(f"Captions are cut at {f['text_len']} tokens of a {f['tokenizer']['vocab_size']}-token BPE "
               "vocabulary learnt from its training captions; words it never saw mean little to it.")
    out.append("Prompts and images are not filtered: it can reproduce whatever its training data "
               "holds, biases included.")
    untrained = [p for p, m in f["parts"].items() if m.get("weights") not in (None, "trained")]
    if untrained:
        out.append(f"Untrained weights ({', '.join(untrained)}): for testing the plumbing only.")
    if not f.get("evaluation"):
        out.append("Not evaluated yet: jobs/evaluate.py adds its figures to this card.")
    return out + f["limitations"]


def _num(x, fmt: str = ",") -> str:
    return "–" if x is None else format(x, fmt)


def render(f: dict) -> str:
    """README.md: YAML front matter (Hugging Face's model-card keys, then every fact under
    `tessera`), then the card for people."""
    lic = f["license"]
    front = {k: v for k, v in lic.items() if v} | {
        "library_name": "tessera", "pipeline_tag": "text-to-image",
        "tags": ["tessera", "text-to-image", "dvae", "autoregressive-prior"], "tessera": f}
    d, e = f["data"], f.get("evaluation")
    has_reranker = "reranker" in f["parts"]
    lines = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(), "---", "",
             f"# {f['name']}", "",
             "A DALL·E-style text-to-image model made with tessera: a discrete VAE that turns images into "
             "a grid of codes, an autoregressive transformer prior over caption and image codes"
             + (", and a contrastive reranker that orders candidate images by their match to the caption"
                if has_reranker else "")
             + f". Exported {f['created']} from run `{f['run']}` (code {f['code_version']}).", "",
             "## Use", "", "```bash",
             "python -m serve serve.app:build_app bundle=<this folder>   # images API + web page",
             "```", "", "```python", "from tessera.sampling.generate import ImageGenerator",
             "ImageGenerator.load('<this folder>').draw('a caption', seed=0).save('out.png')", "```", "",
             "## Model", "", "| part | parameters | training steps | weights |", "|---|---:|---:|---|"]
    lines += [f"| {p} | {_num(m['parameters'])} | {_num(m['steps'])} | {m.get('weights') or '–'} |"
              for p, m in f["parts"].items()]
    lines += ["", f"{_num(f['parameters'])} parameters in all. Images of {f['resolution']}×{f['resolution']} "
              f"px as {f['grid']}×{f['grid']} codes from a codebook of {f['codebook']}; captions up to "
              f"{f['text_len']} tokens of a BPE vocabulary of {f['tokenizer']['vocab_size']} "
              "(`tokenizer.json`). Each part's exact shape is in its JSON file and in the front matter "
              "above.", "",
              "## Training data", ""]
    if d.get("unavailable"):
        lines.append(f"Dataset `{d.get('uri')}`: {d['unavailable']}.")
    else:
        where = f" at `{d['source_uri']}`" if d.get("source_uri") else ""
        splits = ", ".join(f"{k} {_num(v)}" for k, v in (d.get("splits") or {}).items())
        skipped = ", ".join(f"{k} {_num(v)}" for k, v in d["skipped"].items()) or "none"
        lines += [f"Source: {d.get('source')}{where}; {_num(d.get('kept_samples'))} image–caption pairs kept "
                  f"of {_num(d.get('input_samples'))} read (skipped: {skipped}); splits: {splits}. "
                  f"Prepared at {d.get('resolution')} px into `{d['uri']}` "
                  f"(generation {d.get('generation')}); "
                  f"encoded by the dVAE into {_num(d.get('token_rows'))} token rows for the prior."]
    lines += ["", "## Evaluation", ""]
    if e:
        lines += [f"From `{e['report']}` ({e['created']}), on {_num(e.get('val_images'))} val images:", "",
                  "| figure | value |", "|---|---:|",
                  f"| dVAE reconstruction PSNR | {_num(e.get('dvae_psnr_db'), '.2f')} dB |",
                  f"| dVAE codebook use | {_num(e.get('dvae_codebook_usage'), '.1%')} |",
                  f"| prior val image loss | {_num(e.get('prior_val_image_loss_nats'), '.3f')} nats/token |",
                  "| the same in bits per image token | "
                  f"{_num(e.get('prior_val_image_bits_per_token'), '.3f')} |"]
        for split, a in (e.get("caption_accuracy") or {}).items():
            lines.append(f"| caption accuracy, {split} ({a['captions']} captions; attribute classifier) | "
                         f"{_num(a['without_reranking'], '.1%')} → {_num(a['with_reranking'], '.1%')} "
                         "reranked |")
    else:
        lines.append("None yet: `jobs/evaluate.py` on this bundle's run adds its figures here.")
    lines += ["", "## Intended use", "", f["intended_use"], "", "## Limitations", ""]
    lines += [f"- {x}" for x in _limitations(f)]
    lines += ["", "## License", ""]
    if lic.get("license"):
        name = lic.get("license_name") or lic["license"]
        lines.append(f"{name}" + (f": {lic['license_link']}" if lic.get("license_link") else "") + ".")
    else:
        lines.append("Not stated (set `export.card.license`). The training data's own terms apply to "
                     "what it learnt.")
    return "\n".join(lines) + "\n"


def write_card(cfg, manifest: dict, options=None) -> str:
    """Write README.md into the run's bundle (cfg.paths.bundle); returns its URI."""
    uri = storage.join(cfg.paths.bundle, README)
    storage.write_text(uri, render(build_facts(cfg, manifest, cfg.paths.bundle, options)), options)
    return uri


def read_facts(bundle_uri: str, options=None) -> dict | None:
    """The facts in a bundle's README.md front matter; None without a card (or an unreadable one)."""
    uri = storage.join(bundle_uri, README)
    try:
        text = storage.read_bytes(uri, options).decode() if storage.exists(uri, options) else ""
        head, sep, _ = text.removeprefix("---\n").partition("\n---\n")
        facts = (yaml.safe_load(head) or {}).get("tessera") if text.startswith("---\n") and sep else None
    except (storage.StorageError, UnicodeDecodeError, yaml.YAMLError, AttributeError) as e:
        log.warning("%s: unreadable model card (%s)", uri, e)
        return None
    return facts if isinstance(facts, dict) else None


def add_evaluation(bundle_uri: str, report: dict, report_uri: str, options=None) -> bool:
    """Put an evaluation's figures into the bundle's card; False (and a log line) when the bundle
    has no card to update or it cannot be written — the evaluation itself stands either way."""
    facts = read_facts(bundle_uri, options)
    if facts is None:
        log.info("%s: no model card to add the evaluation to (export writes one)", bundle_uri)
        return False
    facts["evaluation"] = evaluation_facts(report, report_uri)
    try:
        storage.write_text(storage.join(bundle_uri, README), render(facts), options)
    except (storage.StorageError, OSError) as e:
        log.warning("%s: model card not updated (%s)", bundle_uri, e)
        return False
    return True


def summary(bundle, *, options=None) -> dict:
    """What GET /v1/models/{id} shows of a bundle (a URI or a loaded tessera.bundle.Bundle): the
    card's facts without URIs or shapes; from the manifest alone when the bundle has no card."""
    from tessera.bundle import read_manifest

    uri = bundle if isinstance(bundle, str) else bundle.uri
    f = read_facts(uri, options)
    if f is None:
        m = read_manifest(uri, options) if isinstance(bundle, str) else bundle.manifest
        return {"name": m["name"], "created": m.get("created"), "card": False,
                "resolution": m.get("resolution"), "text_len": m.get("text_len"),
                "parts": {p: {"parameters": v.get("num_parameters"), "steps": v.get("step")}
                          for p, v in m["parts"].items()}}
    d, e = f["data"], f.get("evaluation")
    return {"name": f["name"], "created": f["created"], "card": True,
            "resolution": f["resolution"], "text_len": f["text_len"], "tokenizer": f["tokenizer"],
            "parts": {p: {k: m.get(k) for k in ("parameters", "steps", "weights")}
                      for p, m in f["parts"].items()},
            "parameters": f["parameters"],
            "data": {k: d.get(k) for k in ("source", "kept_samples", "input_samples", "splits")},
            "evaluation": None if not e else {k: v for k, v in e.items() if k != "report"},
            "license": f["license"], "intended_use": f["intended_use"], "limitations": _limitations(f)}
