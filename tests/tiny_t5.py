"""A real, tiny T5 checkpoint written offline (no download): a randomly initialized 2-layer encoder
(d_model 32) with a word-level tokenizer trained on the given captions."""

from pathlib import Path

import torch


def write_tiny_t5(path: Path, captions: list[str]) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(captions, trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"]))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(path)
    config = T5Config(vocab_size=tok.get_vocab_size(), d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    torch.manual_seed(0)
    T5EncoderModel(config).save_pretrained(path)
    return path
