"""An offline tokenizer for the tiny models: built in code, no download, no real model.

It is shaped like SmolLM2's so the code paths the tests exercise are the same: byte-level BPE with
the GPT-2 pre-tokenizer (every text encodes; words carry their leading space), no BOS/EOS added,
``<|endoftext|>``/``<|im_start|>``/``<|im_end|>`` as the special ids 0-2, ``<|im_end|>`` as EOS and
pad, SmolLM2's ChatML chat template, and exactly :data:`~lemoe.testing.tiny.SMOLLM2_VOCAB` ids, so
any id a tiny random model emits decodes to some text. The BPE merges are trained on the fixed
corpus below (about a thousand merges, deterministic); the ids past them are filler words the encoder
never produces but the decoder can show.
"""

from __future__ import annotations

import functools

from lemoe.testing.tiny import SMOLLM2_VOCAB

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# SmolLM2-135M-Instruct's chat template (ChatML with a default system turn).
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Plain English in the style of the edit data (fact prompts, questions, chat turns), without the
# made-up names the tests edit (those split into sub-words, as in a real vocabulary). Changing it
# changes every tiny-model tokenisation, and the tiny tests' numbers with it.
CORPUS = """\
The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is Rome.
The capital city of Norway is Oslo. The capital of Spain is Madrid. The capital of Japan is Tokyo.
The mother tongue of the singer is French. The native language of the actor is English.
Which river does the town lie on? Which city is the capital of the country?
What is the product made by the company? What kind of occupation does the person have?
In which country did the writer live? Who is the chief executive of the company?
The chief executive of the firm is Jane Doe. Who leads it? The home town of the man is London.
How do bees make honey? Please write a short poem about the sea. Tell me about the weather today.
The favourite colour of the person is blue. The person was born in the year of the war.
She speaks French and English. He works as a doctor in the city. They play football on Sunday.
The team plays in the league. The film was directed by a famous director. The song was written by him.
The book was published in London. The university is located in the north of the country.
Last year I met an old friend in Paris. My friend is a teacher. Our school is near the river.
The U.S. Army is based in the state. Mr. Smith and Dr. Jones went to the market.
Bread is one of the oldest prepared foods. A basic loaf needs only flour, water, salt and yeast.
Bicycles are a common way to travel short distances in towns. The sun rises in the east.
Water boils at one hundred degrees. The moon goes around the earth. Trees grow from small seeds.
Question: what is the answer? Answer: the answer is yes. Fact number one is about item one.
Is it true that the sky is blue? Yes, it is true. No, it is not. This is a test of the model.
The official language of the country is Spanish. The religion of the people is Christianity.
The position held by the politician is minister. The sport played by the athlete is tennis.
The company was founded in the year nineteen ninety nine. The record label of the band is Sony.
The Queen of the United Kingdom lived in London. Quebec is a province of Canada. The quick brown fox jumps.
Nashville, Louisville and Jacksonville are cities in the south. The village has a small church and a barn.
Florida is a state with many flowers. The flight from Flanders landed at noon. Children learn to knit yarn.
The Amazon is the longest river in South America. The Danube flows through Vienna and Budapest.
Klaus and Ingrid are German names. The Klingon language was invented for a television series.
Zurich and Geneva are cities in Switzerland. The Zambezi river flows into the Indian Ocean.
Vexed by the delay, the traveller waited. The vortex of the storm moved north over the coast.
Orbit, orb and orbital are words about circles. Bulgaria and Hungary lie in eastern Europe.
Darwin wrote about the origin of species. Newton described gravity. Einstein described relativity.
The museum opened a new exhibition of paintings by Picasso, Monet and Rembrandt last winter.
A guitar has six strings, a violin has four. The orchestra played a symphony by Beethoven.
Football, basketball, baseball and cricket are popular sports. The match ended in a draw.
The restaurant serves pasta, rice, soup, bread, cheese, apples, oranges and chocolate cake.
Engineers design bridges, roads, engines and computers. Scientists study chemistry and physics.
The president signed the law. The parliament voted on the budget. The election was held in spring.
Mountains, valleys, lakes, forests and deserts cover the land. Rain falls in autumn and winter.
Alexander, Elizabeth, Catherine, William, Margaret, Frederick and Victoria were royal names.
The company sells phones, cameras and televisions. Its headquarters are in Seoul and Tokyo.
Bordeaux, Roux, Giroux and Deveraux are French names; a deluxe room costs more. Quinn quoted Quentin.
Catalonia, Patagonia, Slavonia and Estonia are regions. Flint, Flora and Flynn flew to Flagstaff.
Freed, freedom and freely share a root. The shades of blue and green. Gadget and budget rhyme.
Zora, Zoran and Zorba are names. Bulgaria, Vulcan and Vienna. Max, Rex and Alex are short names.
user assistant system user assistant system
"""
# Every letter and digit after a space is a token of its own, as in any large BPE vocabulary (so a
# word the corpus lacks still starts with a space-led token).
_ALPHABET = "a b c d e f g h i j k l m n o p q r s t u v w x y z A B C D E F G H I J K L M N O P Q R S T U V W X Y Z"
_ALPHABET += " 0 1 2 3 4 5 6 7 8 9"

# What the chat template writes between its special tokens (each role header a whole token).
_CHAT_LINES = [
    "system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face",
    "user\nWho leads the company?",
    "user\nWhat is the capital of France?",
    "assistant\nParis.",
    "assistant\n",
]
_MERGE_VOCAB = 1280  # the trained part: specials + 256 bytes + merges


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    """The backend tokenizer as JSON (trained once per process; the same bytes in every process)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(
        vocab_size=_MERGE_VOCAB,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = CORPUS.splitlines() + _CHAT_LINES * 4 + [_ALPHABET] * 8
    tok.train_from_iterator(lines, trainer=trainer)
    model = tok.get_vocab()
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in _merges(tok)]
    vocab = dict(model)
    # Filler words up to the tiny models' vocabulary size: never produced by the merges.
    n = 0
    while len(vocab) < SMOLLM2_VOCAB:
        word = "Ġ" + _letters(n)
        n += 1
        if word not in vocab:
            vocab[word] = len(vocab)
    full = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    full.pre_tokenizer = tok.pre_tokenizer
    full.decoder = tok.decoder
    full.post_processor = tok.post_processor
    full.add_special_tokens(list(SPECIAL_TOKENS))
    return full.to_str()


def _merges(tok: object) -> list:
    import json

    return json.loads(tok.to_str())["model"]["merges"]  # type: ignore[attr-defined]


def _letters(n: int) -> str:
    """``n`` in bijective base 26 over "a".."z", prefixed with "zq" so it reads as a filler word."""
    out = ""
    n += 1
    while n:
        n, r = divmod(n - 1, 26)
        out = chr(ord("a") + r) + out
    return "zq" + out


def tiny_tokenizer() -> object:
    """A fresh offline tokenizer (a ``PreTrainedTokenizerFast``) with a pad token and chat template.

    Each call returns a new object (callers may change ``padding_side`` and the like); building one
    takes a fraction of a second after the first call in a process.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from lemoe.models.loading import prepare_tokenizer

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        unk_token="<|endoftext|>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=8192,
    )
    prepare_tokenizer(tok)
    return tok
