"""Build a tiny random-weight MarianMT translator folder offline, laid out like Helsinki-NLP/opus-mt-zh-en.

Tests and the docs' example of ``build_mar.sh --translator`` need a translation model without a hub. The folder
holds what a downloaded opus-mt model holds: ``config.json``, ``generation_config.json``, ``model.safetensors``,
``source.spm`` and ``target.spm`` (sentencepiece models, trained here on a few sentences with character
pieces), ``vocab.json`` (the shared piece -> id map) and ``tokenizer_config.json``, so it loads through the
same ``AutoTokenizer``/``AutoModelForSeq2SeqLM`` calls as the real one. Its translations are random text; the
output is biased towards the English pieces and away from ending early, so a translation is a non-empty
ASCII string of ``MAX_LENGTH`` pieces.

    python -m builder.tiny_translator build/tiny-translator
"""

import io
import json
import sys
from pathlib import Path

import torch

SOURCE_TEXT = ["一只红色的狐狸在雪地里", "山上的灯塔", "夜晚的城市", "一只猫坐在窗台上", "油画风格的花园"]
TARGET_TEXT = ["a red fox in the snow", "a lighthouse on the mountain", "a city at night",
               "a cat sitting on the windowsill", "a garden in the style of an oil painting"]
SPECIAL = ("</s>", "<unk>")
PAD = "<pad>"
MAX_LENGTH = 12  # pieces in a translation (generation_config max_length, counting the decoder start)


def _train_spm(sentences: list[str]) -> bytes:
    """A character-level sentencepiece model of ``sentences`` (the trainer runs in memory, offline)."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, model_type="char", vocab_size=len(set("".join(
            sentences).replace(" ", ""))) + 4, character_coverage=1.0, minloglevel=2,
        bos_id=-1, eos_id=1, unk_id=2, pad_id=-1, user_defined_symbols=[])
    return model.getvalue()


def _pieces(spm: bytes) -> list[str]:
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_proto=spm)
    return [processor.id_to_piece(index) for index in range(processor.get_piece_size())]


def build_tiny_translator(folder: Path, seed: int = 0) -> Path:
    """Write the tiny translator folder and return it."""
    from transformers import GenerationConfig, MarianConfig, MarianMTModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    source, target = _train_spm(SOURCE_TEXT), _train_spm(TARGET_TEXT)
    (folder / "source.spm").write_bytes(source)
    (folder / "target.spm").write_bytes(target)
    pieces = list(SPECIAL)
    for piece in _pieces(source) + _pieces(target):
        if piece not in pieces and not piece.startswith("<"):
            pieces.append(piece)
    pieces.append(PAD)  # opus-mt models keep <pad> last: it is also the decoder start token
    vocab = {piece: index for index, piece in enumerate(pieces)}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=1))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "MarianTokenizer", "source_lang": "zh", "target_lang": "en", "model_max_length": 512,
        "unk_token": "<unk>", "eos_token": "</s>", "pad_token": PAD, "separate_vocabs": False}))

    pad_id, eos_id = vocab[PAD], vocab["</s>"]
    config = MarianConfig(
        vocab_size=len(vocab), decoder_vocab_size=len(vocab), d_model=16, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        max_position_embeddings=512, pad_token_id=pad_id, eos_token_id=eos_id, decoder_start_token_id=pad_id,
        forced_eos_token_id=eos_id, share_encoder_decoder_embeddings=True, scale_embedding=True,
        init_std=0.5)  # large random weights, so that different inputs give different outputs
    torch.manual_seed(seed)
    model = MarianMTModel(config)
    english = {vocab[piece] for piece in _pieces(target) if piece in vocab and piece.isascii() and piece.isalpha()}
    with torch.no_grad():
        bias = torch.full((1, len(vocab)), -10.0)
        bias[0, sorted(english)] = 10.0
        model.final_logits_bias.copy_(bias)
    model.generation_config = GenerationConfig(
        max_length=MAX_LENGTH, num_beams=1, do_sample=False, pad_token_id=pad_id, eos_token_id=eos_id,
        decoder_start_token_id=pad_id, forced_eos_token_id=eos_id)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m builder.tiny_translator FOLDER")
    print(f"tiny translator written to {build_tiny_translator(Path(sys.argv[1]))}")
