"""A real, tiny, randomly initialised model bundle for tests of sampling and serving: the debug
dVAE, a small prior and a small reranker over a BPE tokenizer trained on shapes captions, written
through the same export and bundle code the pipeline uses."""

from __future__ import annotations

from pathlib import Path

import torch

SHAPES_CAPTIONS = [f"a {size} {color} {shape} on the {where}" for size in ("small", "large")
                   for color in ("red", "green", "blue", "yellow")
                   for shape in ("circle", "square", "triangle")
                   for where in ("left", "right", "top", "bottom")]


def make_bundle(out_dir: Path, *, seed: int = 0, reranker: bool = True, name: str = "tessera-test") -> str:
    """Writes the parts' exports under out_dir/parts and the bundle at out_dir/bundle; returns its URI."""
    from safetensors.torch import save

    from tessera import artifacts, storage
    from tessera.bundle import write_bundle
    from tessera.data.tokenizer import train_tokenizer
    from tessera.models.dvae import DVAE, NAMED_SHAPES
    from tessera.models.prior import Prior, PriorShape

    out_dir = Path(out_dir)
    parts = out_dir / "parts"
    torch.manual_seed(seed)
    tok = train_tokenizer(SHAPES_CAPTIONS, vocab_size=300, min_frequency=1)
    (parts / "tokenizer").mkdir(parents=True, exist_ok=True)
    (parts / "tokenizer" / "tokenizer.json").write_text(tok.to_str())

    dvae_shape = NAMED_SHAPES["debug"]
    artifacts.export("dvae", DVAE(dvae_shape).state_dict(), dvae_shape, str(parts / "dvae"), step=0,
                     weights="init")
    prior_shape = PriorShape(text_vocab=tok.get_vocab_size(), image_vocab=dvae_shape.num_tokens, text_len=16,
                             grid=dvae_shape.grid_size, dim=64, depth=2, heads=4, attention="sparse",
                             conv_kernel=3)
    prior = Prior(prior_shape)
    storage.write_bytes(str(parts / "prior" / artifacts.PARTS["prior"].weights), save(prior.state_dict()))
    storage.write_json(str(parts / "prior" / artifacts.PARTS["prior"].meta),
                       {"kind": artifacts.PARTS["prior"].kind, "format_version": 1,
                        "shape": prior_shape.to_dict(), "step": 0, "weights": "init"})
    reranker_uri = None
    if reranker:
        from tessera.models.reranker import Reranker, RerankerShape

        r_shape = RerankerShape(text_vocab=tok.get_vocab_size(), text_len=16, image_size=32, embed_dim=32,
                                text_dim=32, text_depth=1, text_heads=4, image_width=8, image_stages=3,
                                image_grid=4)
        storage.write_bytes(str(parts / "reranker" / "reranker.safetensors"),
                            save(Reranker(r_shape).state_dict()))
        storage.write_json(str(parts / "reranker" / "reranker.json"),
                           {"kind": "tessera.reranker", "format_version": 1, "shape": r_shape.to_dict(),
                            "step": 0})
        reranker_uri = str(parts / "reranker")
    write_bundle(str(out_dir / "bundle"), dvae_uri=str(parts / "dvae"), prior_uri=str(parts / "prior"),
                 tokenizer_uri=str(parts / "tokenizer" / "tokenizer.json"), reranker_uri=reranker_uri,
                 name=name, overwrite=True)
    return str(out_dir / "bundle")
