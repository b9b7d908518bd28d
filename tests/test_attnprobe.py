"""The attentive probe: its head against a plain float64 formula, what it can learn that average
pooling cannot, and the command (shared loop with the linear probe, its own checkpoints)."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from randsac_fast.eval import attnprobe, linprobe


def test_head_matches_the_formula_in_float64():
    torch.manual_seed(0)
    head = attnprobe.AttentivePoolingHead(dim=8, num_heads=2, num_classes=3, num_queries=2).double().eval()
    with torch.no_grad():
        head.norm.running_mean.normal_()
        head.norm.running_var.uniform_(0.5, 2.0)
    x = torch.randn(4, 5, 8, dtype=torch.float64)
    z = (x - head.norm.running_mean) / torch.sqrt(head.norm.running_var + 1e-6)
    k, v = head.k(z), head.v(z)
    outs = []
    for q in head.queries[0]:                                   # each query, each head, plain softmax
        per_head = []
        for h in range(2):
            sl = slice(4 * h, 4 * h + 4)
            w = torch.softmax(k[..., sl] @ q[sl] / math.sqrt(4), dim=-1)          # [B, N]
            per_head.append((w[..., None] * v[..., sl]).sum(1))
        outs.append(torch.cat(per_head, -1))
    want = head.linear(torch.stack(outs).mean(0))
    torch.testing.assert_close(head(x), want, rtol=1e-12, atol=1e-12)
    perm = torch.randperm(5)
    torch.testing.assert_close(head(x[:, perm]), head(x), rtol=1e-12, atol=1e-12)   # a set, not a sequence


def test_bad_heads_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="--heads a divisor of 10"):
        attnprobe.AttentivePoolingHead(10, 3, 2)


def _marked(b, n, d, g):
    """[b, n, d] tokens whose label (sign of feature 1) lives in one token, marked by feature 0."""
    labels = torch.randint(0, 2, (b,), generator=g)
    x = torch.randn(b, n, d, generator=g)
    where = torch.randint(0, n, (b,), generator=g)
    x[torch.arange(b), where, 0] = 6.0                             # the marker
    x[torch.arange(b), where, 1] = (2 * labels - 1).float() * 3.0  # the label, only in the marked token
    return x, labels


def test_attention_finds_the_token_that_average_pooling_dilutes():
    """The label lives in one token among 16, marked by a feature: the attentive head learns to read
    it; a linear head on the average (the linear probe's features) does much worse on held-out data."""
    g = torch.Generator().manual_seed(0)
    (x, y), (x_test, y_test) = _marked(256, 16, 16, g), _marked(512, 16, 16, g)
    torch.manual_seed(0)

    def fit(head, inputs, test_inputs):
        opt = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=0.0)
        for _ in range(200):
            opt.zero_grad()
            F.cross_entropy(head(inputs), y).backward()
            opt.step()
        head.eval()
        return (head(test_inputs).argmax(1) == y_test).float().mean().item()

    acc_attn = fit(attnprobe.AttentivePoolingHead(16, 1, 2), x, x_test)
    acc_lin = fit(linprobe.ProbeHead(16, 2), x.mean(1), x_test.mean(1))
    assert acc_attn > 0.95 and acc_lin < 0.8, (acc_attn, acc_lin)


def _tiny_checkpoint(tmp_path):
    from randsac_fast.train.trainer import main
    out = tmp_path / "pre"
    assert main(["--preset", "aim_digits", "--steps", "2", "--log-every", "1", "--no-probe", "--workers", "0",
                 "--out", str(out), "--device", "cpu"]) == 0
    return str(out / "checkpoints" / "step_00000002")


def test_command_scores_every_image_and_keeps_its_own_checkpoints(tmp_path, capsys):
    ckpt = _tiny_checkpoint(tmp_path)
    out = tmp_path / "attn"
    argv = ["--ckpt", ckpt, "--data", "digits", "--out", str(out), "--epochs", "1", "--warmup-epochs", "0",
            "--device", "cpu"]
    assert attnprobe.main(argv) == 0
    said = capsys.readouterr().out
    assert "== attentive probe done ==" in said
    result = json.load(open(out / "results.json"))
    assert result["val_images"] == 450 and 0.0 <= result["top1"] <= 1.0
    # the linear probe refuses to resume the attentive probe's checkpoints (and says how to go on)
    code = linprobe.main(["--ckpt", ckpt, "--data", "digits", "--out", str(out), "--resume", "latest",
                          "--epochs", "1", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code != 0 and "attnprobe checkpoint, not a linprobe one" in err, err
