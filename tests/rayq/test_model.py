import torch

from rayq.model import BLOCK_LINEARS, GPT, param_groups
from rayq.schema import ModelConfig

CFG = ModelConfig(vocab_size=97, seq_len=16, n_layer=2, d_model=32, n_head=4)


def test_shapes_names_and_untied_embeddings():
    model = GPT(CFG)
    logits = model(torch.randint(0, 97, (3, 16)))
    assert logits.shape == (3, 16, 97)
    names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(BLOCK_LINEARS)}
    assert {f"blocks.{i}.{s}" for i in range(2) for s in ("attn.qkv", "attn.out", "mlp.fc_in", "mlp.fc_out")} == names
    assert model.lm_head.weight.data_ptr() != model.tok_emb.weight.data_ptr()


def test_causal():
    model = GPT(CFG).eval()
    x = torch.randint(0, 97, (1, 16))
    y = x.clone()
    y[0, 10:] = (y[0, 10:] + 1) % 97
    assert torch.allclose(model(x)[0, :10], model(y)[0, :10], atol=1e-6)


def test_weight_decay_only_on_matrices():
    model = GPT(CFG)
    decay, no_decay = param_groups(model, 0.1)
    assert all(p.dim() >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert all(p.dim() < 2 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_dropout_only_on_block_outputs_not_embeddings():
    model = GPT(CFG, dropout=0.5)
    dropout_parents = {n.rsplit(".", 1)[0] for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout)}
    assert dropout_parents == {f"blocks.{i}.{s}" for i in range(2) for s in ("attn", "mlp")}
    model.eval()  # eval disables dropout: deterministic
    x = torch.randint(0, 97, (2, 16))
    assert torch.equal(model(x), model(x))
