"""The scoring engine (memaudit.scoring) against an independent full-logits computation."""
import math

import numpy as np
import torch

from memaudit import load_model, read_documents, score, tokenize


def test_scores_equal_full_logits_loop(memorized):
    m = load_model(memorized.model_dir)
    docs = read_documents(memorized.heldout_file, limit=7)
    seqs = [t[: 10 + 9 * i] for i, t in enumerate(tokenize(m.tokenizer, docs.text))]  # ragged lengths
    stats = score(m.model, seqs, batch_size=3, bos_id=m.tokenizer.bos_token_id)
    for seq, st in zip(seqs, stats):
        ids = torch.tensor([[m.tokenizer.bos_token_id] + seq])
        with torch.no_grad():
            lsm = torch.log_softmax(m.model(ids).logits[0, :-1].double(), -1)
        tgt = ids[0, 1:]
        lp = lsm[torch.arange(len(tgt)), tgt]
        p = lsm.exp()
        mu = (p * lsm).sum(-1)
        var = (p * lsm**2).sum(-1) - mu**2
        assert len(st) == len(seq)
        np.testing.assert_allclose(st.logprob, lp.numpy(), atol=1e-4)
        np.testing.assert_allclose(st.mean_lp, mu.numpy(), atol=1e-4)
        np.testing.assert_allclose(st.var_lp, var.numpy(), atol=1e-3)
        np.testing.assert_array_equal(st.hit, (lsm.argmax(-1) == tgt).numpy())
        assert math.isclose(st.bits, -lp.sum().item() / math.log(2), rel_tol=1e-4)
