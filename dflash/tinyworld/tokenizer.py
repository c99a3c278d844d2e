"""Byte-level BPE tokenizer for the tiny world, wrapped as a transformers tokenizer.

Special tokens get the first ids (0..4) in the order of SPECIAL_TOKENS. They are added
tokens, so ordinary text can only produce them by spelling them out literally; the BPE
merges are learned with them stripped from the text, so no merge ever builds them.
"""

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN, END_TOKEN, USER_TOKEN, ASSISTANT_TOKEN = "<|pad|>", "<|end|>", "<|user|>", "<|assistant|>"
MASK_TOKEN = "<|MASK|>"  # the DFlash draft's mask token: never produced by normal text
SPECIAL_TOKENS = [PAD_TOKEN, END_TOKEN, USER_TOKEN, ASSISTANT_TOKEN, MASK_TOKEN]

# Exactly the corpus chat format: "<|role|>\n{content}<|end|>\n" per message, and
# "<|assistant|>\n" as the generation prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def train_tokenizer(texts, vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    # Digit runs are split from the space before them, so "15" is the same token in
    # "has 15 apples" and in the answer "15 - 1 = 14": copying numbers is exact copying.
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=False),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is ever unknown
        show_progress=False,
    )

    def strip_special(text):
        for s in SPECIAL_TOKENS:
            text = text.replace(s, "\n")
        return text

    tok.train_from_iterator((strip_special(t) for t in texts), trainer, length=len(texts))

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=END_TOKEN,
        pad_token=PAD_TOKEN,
        mask_token=MASK_TOKEN,
        additional_special_tokens=[USER_TOKEN, ASSISTANT_TOKEN],
        chat_template=CHAT_TEMPLATE,
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )
