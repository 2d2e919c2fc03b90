"""Dataset formats beyond plain text: conversations (with a loss mask), JSON Lines and CSV.

`npgpt2 encode --format chat data.jsonl out.npz` reads OpenAI's fine-tuning format, one
conversation a line:

    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}]}

Each conversation becomes the transcript `npgpt2 chat` itself builds (chat.header_ids and
chat.turn_ids, the same functions ChatSession's prompts are made of), followed by
<|endoftext|>. Alongside the tokens goes a loss mask, one 0/1 per token, where 1 marks a
token the model is trained to predict:

    Q: What does 'kludge' mean?\\n A: A clever programming trick.\\n Q: ...      <|endoftext|>
    0  0 ... 0 ...              0   0   1 1   1       1           1 1  1   0 0 ... 0  (1 or 0)

- every token of an assistant reply after its tag (the reply's text and the newline that
  closes its line);
- then what ends the reply: every token of the next turn's speaker tag (`Q` and `:` above:
  a chat stops a reply where a line starts with a whole tag, so the whole tag is what the
  model must learn to write), or the <|endoftext|> after the conversation's last turn;
- nothing else: the system text, the user's turns, the bot's own tag (it is part of the
  prompt), the <|endoftext|> after a conversation that ends on a user turn.
An assistant message with `"weight": 0` (OpenAI's field) is masked out entirely.

Where the mask is stored: np.load and nshepperd's/OpenAI's load_dataset read every member of
an .npz as a token array, so an extra mask member would be read as tokens. The mask of member
`arr_<i>.npy` is therefore in that member's zip comment (`npgpt2-mask:<n>:` then the bits,
np.packbits), and the chat template in the archive's comment (JSON); both are invisible to
np.load, so other tools read exactly the tokens, and old files (no comments) load unchanged.

`--format jsonl` takes the "text" field of each line, `--format csv` one column of each row
(gpt-2-simple's encode_csv, by header name); documents are joined by <|endoftext|>.
"""
import csv
import json
import logging
import zipfile
from pathlib import Path

import numpy as np

from . import chat
from .data import _add_member, _member_order, check_encoding, expand_paths, load_dataset, read_text_blocks
from .errors import Npgpt2Error
from .fsutil import atomic_write, parse_json
from .tokenizer import ENDOFTEXT

log = logging.getLogger(__name__)

FORMATS = ("text", "chat", "jsonl", "csv")
ROLES = {"user": chat.USER, "assistant": chat.BOT}
MASK_MAGIC = b"npgpt2-mask:"
TEMPLATE_KEY = "npgpt2_chat_template"
MEMBER_TOKENS = 65535 * 8  # a zip comment holds at most 65535 bytes: one bit per token


# ---------------------------------------------------------------- reading the inputs
def _lines(path, encoding):
    """(line number from 1, line) of a text file, universal newlines."""
    rest, n = "", 0
    for block in read_text_blocks(path, encoding):
        lines = (rest + block).split("\n")
        rest = lines.pop()
        for line in lines:
            n += 1
            yield n, line
    if rest:
        yield n + 1, rest


def _json_objects(path, encoding):
    """(line number, dict) for each non-blank line of a JSON Lines file."""
    for n, line in _lines(path, encoding):
        if not line.strip():
            continue
        obj = parse_json(line, f"{path}:{n}")
        if not isinstance(obj, dict):
            raise Npgpt2Error(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
        yield n, obj


def parse_conversation(obj, where):
    """{"messages": [...]} -> (system text, [(chat.USER|chat.BOT, text, weight)]).

    where: 'file:line' for the error messages. Contents are stripped of surrounding
    whitespace, as the server does with /v1/chat messages.
    """
    if "messages" not in obj:
        raise Npgpt2Error(f"{where}: missing \"messages\"")
    messages = obj["messages"]
    if not isinstance(messages, list):
        raise Npgpt2Error(f"{where}: \"messages\" must be a list, got {type(messages).__name__}")
    if not messages:
        raise Npgpt2Error(f"{where}: \"messages\": empty conversation")
    system, turns = "", []
    for i, m in enumerate(messages):
        field = f"messages[{i}]"
        if not isinstance(m, dict):
            raise Npgpt2Error(f"{where}: {field} must be an object with \"role\" and \"content\"")
        role = m.get("role")
        if role != "system" and (not isinstance(role, str) or role not in ROLES):
            raise Npgpt2Error(f"{where}: {field}.role: unknown role {json.dumps(role)} "
                              f"(system, user or assistant)")
        content = m.get("content")
        if not isinstance(content, str):
            raise Npgpt2Error(f"{where}: {field}.content: must be a string, got {json.dumps(content)[:40]}")
        if role == "system":
            if i != 0:
                raise Npgpt2Error(f"{where}: {field}.role: \"system\" is allowed only as the first message")
            system = content
            continue
        weight = m.get("weight", 1)
        if role != "assistant" and "weight" in m or weight not in (0, 1) or isinstance(weight, bool):
            raise Npgpt2Error(f"{where}: {field}.weight: must be 0 or 1 on an assistant message")
        turns.append((ROLES[role], content.strip(), weight))
    if not any(r == chat.BOT for r, _, _ in turns):
        raise Npgpt2Error(f"{where}: \"messages\": no assistant turn (nothing to train on)")
    return system, turns


def conversation_ids(tokenizer, system, turns, user_tag, bot_tag, eot):
    """The training transcript of one conversation and its loss mask (see the module doc).

    turns: [(chat.USER|chat.BOT, text, weight)]. Returns (ids, mask) lists of equal length,
    the last id being eot; tokenizer.decode(ids[:-1]) == chat.transcript_text(...).
    """
    tags = {chat.USER: user_tag, chat.BOT: bot_tag}
    ids = chat.header_ids(tokenizer, system)
    mask = [0] * len(ids)
    ending = 0  # 1 when the previous turn was a trained reply: this turn's tag is what ends it
    for role, text, weight in turns:
        tag, rest = chat.turn_ids(tokenizer, tags[role], text)
        trained = int(role == chat.BOT and weight == 1)
        ids += tag + rest
        mask += [ending] * len(tag) + [trained] * len(rest)
        ending = trained
    return ids + [eot], mask + [ending]


def iter_conversations(path, encoding="utf-8"):
    """(line number, system, turns) for each conversation of a chat JSON Lines file."""
    for n, obj in _json_objects(path, encoding):
        system, turns = parse_conversation(obj, f"{path}:{n}")
        yield n, system, turns


def iter_jsonl_texts(path, encoding="utf-8", field="text"):
    for n, obj in _json_objects(path, encoding):
        if field not in obj:
            raise Npgpt2Error(f"{path}:{n}: missing \"{field}\"")
        if not isinstance(obj[field], str):
            raise Npgpt2Error(f"{path}:{n}: \"{field}\" must be a string, got {type(obj[field]).__name__}")
        yield obj[field]


def iter_csv_texts(path, encoding="utf-8", column="text"):
    """The `column` of each row of a CSV file with a header row (gpt-2-simple's encode_csv
    took the first column; here it is named)."""
    text = "".join(read_text_blocks(path, encoding))
    reader = csv.reader(text.splitlines(keepends=True))
    header = next(reader, None)
    if header is None or column not in header:
        raise Npgpt2Error(f"{path}:1: no column named {column!r} in the header "
                          f"({', '.join(map(repr, header or []))}) (--column)")
    k = header.index(column)
    try:
        for row in reader:
            if row and len(row) <= k:
                raise Npgpt2Error(f"{path}:{reader.line_num}: row has {len(row)} fields, no {column!r} (--column)")
            if row:
                yield row[k]
    except csv.Error as e:
        raise Npgpt2Error(f"{path}:{reader.line_num}: not valid CSV ({e})") from None


# ---------------------------------------------------------------- writing the .npz
def _member_comment(mask):
    return MASK_MAGIC + b"%d:" % mask.size + np.packbits(mask.astype(np.uint8)).tobytes()


def write_npz(out_npz, pieces, template=None):
    """Write (tokens, mask or None) pieces as members arr_0, arr_1, ... of out_npz, atomically;
    a mask goes in its member's comment, template (a dict) in the archive comment.
    Returns (tokens written, members)."""
    total = members = 0
    with atomic_write(out_npz) as f:
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True) as zf:
            for tokens, mask in pieces:
                _add_member(zf, members, tokens)
                if mask is not None:
                    zf.getinfo(f"arr_{members}.npy").comment = _member_comment(mask)
                members += 1
                total += tokens.size
            if template is not None:
                zf.comment = json.dumps({TEMPLATE_KEY: template}).encode("utf-8")
        if total == 0:
            raise Npgpt2Error(f"{out_npz}: no text to encode (the input is empty)")
    return total, members


def _chat_pieces(paths, tokenizer, template, encoding, combine):
    """(tokens, mask) members of about `combine` tokens, whole conversations each."""
    eot = tokenizer.eot_token
    if eot is None:
        raise Npgpt2Error(f"{ENDOFTEXT}: the model's vocabulary lacks it; --format chat separates "
                          f"conversations with it")
    dtype = np.uint16 if tokenizer.n_vocab <= 1 << 16 else np.uint32
    ids, mask = [], []
    for path in paths:
        for n, system, turns in iter_conversations(path, encoding):
            try:
                i, m = conversation_ids(tokenizer, system or template["system"], turns,
                                        template["user_tag"], template["bot_tag"], eot)
            except Npgpt2Error as e:  # a token a compact vocabulary lacks
                raise Npgpt2Error(f"{path}:{n}: \"messages\": {e}") from None
            ids += i
            mask += m
            if len(ids) >= min(combine, MEMBER_TOKENS):
                yield np.asarray(ids, dtype), np.asarray(mask, np.uint8)
                ids, mask = [], []
    if ids:
        yield np.asarray(ids, dtype), np.asarray(mask, np.uint8)


def _document_pieces(paths, tokenizer, fmt, encoding, combine, column):
    def texts():
        first = True
        for path in paths:
            docs = iter_jsonl_texts(path, encoding) if fmt == "jsonl" else iter_csv_texts(path, encoding, column)
            for doc in docs:
                if not first:
                    yield ENDOFTEXT
                first = False
                yield doc
    for arr in tokenizer.encode_iter(texts(), allowed_special={ENDOFTEXT}, block_chars=combine):
        if arr.size:
            yield arr, None


def encode_dataset(inputs, out_npz, tokenizer, fmt="chat", user_tag=chat.DEFAULT_USER_TAG,
                   bot_tag=chat.DEFAULT_BOT_TAG, system="", column="text", encoding="utf-8", combine=50000):
    """`npgpt2 encode --format chat|jsonl|csv`: inputs (file, folder, glob) -> out_npz.

    Returns {"tokens", "files", "members", "trained"} (trained: tokens whose mask is 1; None
    without a mask). Raises Npgpt2Error naming file, line and field for bad input; nothing is
    written then.
    """
    if fmt not in FORMATS[1:]:
        raise Npgpt2Error(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    check_encoding(encoding)
    if combine < 1:
        raise Npgpt2Error(f"--combine must be >= 1, got {combine}")
    paths = expand_paths(inputs, "input")
    out_npz = Path(out_npz)
    if out_npz.resolve() in {p.resolve() for p in paths}:
        raise Npgpt2Error(f"{out_npz}: the output is also an input")
    if not out_npz.parent.is_dir():
        raise Npgpt2Error(f"{out_npz.parent}: output folder does not exist")
    trained = None
    if fmt == "chat":
        chat.check_tags(user_tag, bot_tag)
        template = {"user_tag": user_tag, "bot_tag": bot_tag, "system": system}
        trained = [0]

        def counted(pieces):
            for tokens, mask in pieces:
                trained[0] += int(mask.sum())
                yield tokens, mask
        total, members = write_npz(out_npz, counted(_chat_pieces(paths, tokenizer, template, encoding, combine)),
                                   template)
        trained = trained[0]
    else:
        total, members = write_npz(out_npz, _document_pieces(paths, tokenizer, fmt, encoding, combine, column))
    return {"tokens": total, "files": len(paths), "members": members, "trained": trained}


# ---------------------------------------------------------------- reading the .npz back
def read_npz_extras(path):
    """(masks, template) of an .npz: masks is a list with each token member's mask (uint8,
    in read_npz_tokens' order), or None when no member has one; template the chat template
    dict or None. Raises Npgpt2Error naming the file and member for a mask that does not fit."""
    try:
        with zipfile.ZipFile(path) as zf:
            infos = sorted((i for i in zf.infolist() if i.filename.endswith(".npy")),
                           key=lambda i: _member_order(i.filename[:-4]))
            comment = zf.comment
    except (OSError, zipfile.BadZipFile) as e:
        raise Npgpt2Error(f"{path}: not a readable .npz token file ({e})") from None
    template = None
    if comment:
        try:
            template = parse_json(comment, f"{path}: the archive comment").get(TEMPLATE_KEY)
        except (Npgpt2Error, AttributeError):
            template = None  # someone else's comment
    if not any(i.comment.startswith(MASK_MAGIC) for i in infos):
        return None, template
    masks = []
    with np.load(path, allow_pickle=False) as npz:
        for info in infos:
            name = info.filename[:-4]
            n = npz[name].size
            head, _, bits = info.comment[len(MASK_MAGIC):].partition(b":")
            if not info.comment.startswith(MASK_MAGIC) or not head.isdigit():
                raise Npgpt2Error(f"{path}: member '{name}' has no loss mask while others have")
            if int(head) != n or len(bits) != (n + 7) // 8:
                raise Npgpt2Error(f"{path}: member '{name}' has {n} tokens but a loss mask of "
                                  f"{int(head) if int(head) != n else len(bits) * 8} (mask length != tokens)")
            masks.append(np.unpackbits(np.frombuffer(bits, np.uint8), count=n))
    return masks, template


def load_masked_dataset(path_or_glob, tokenizer=None, encoding="utf-8", combine=50000, what="--dataset",
                        keep_crlf=False):
    """(tokens, mask or None, template or None): data.load_dataset's tokens, and when an .npz
    among the inputs has a loss mask, the mask over all of them (1 for files without one).

    Raises Npgpt2Error when masked .npz files are mixed with text files (give those to encode
    first: the separators load_dataset puts between text files have no mask).
    """
    tokens = load_dataset(path_or_glob, tokenizer, encoding, combine, what, keep_crlf)
    paths = expand_paths(path_or_glob, what)
    parts, template, masked = [], None, False
    for p in paths:
        if p.suffix != ".npz":
            parts.append(None)
            continue
        masks, t = read_npz_extras(p)
        masked |= masks is not None
        template = template or t
        parts.append(masks if masks is not None else [np.ones(a.size, np.uint8) for a in _token_members(p)])
    if not masked:
        return tokens, None, template
    if any(m is None for m in parts):
        text = next(p for p, m in zip(paths, parts) if m is None)
        raise Npgpt2Error(f"{text}: text input mixed with a masked .npz in {what}; encode it first")
    mask = np.concatenate([m for ms in parts for m in ms])
    if mask.size != tokens.size:
        raise Npgpt2Error(f"{path_or_glob}: loss mask of {mask.size} != {tokens.size} tokens ({what})")
    return tokens, mask, template


def _token_members(path):
    from .data import read_npz_tokens
    return list(read_npz_tokens(path))


def training_mask(train_on, mask, source, what="--train_on"):
    """The mask training uses: None for --train_on all (or no mask), the dataset's for
    assistant (the default when it has one). Raises Npgpt2Error for assistant without a mask
    and for a mask with no 1s."""
    if train_on == "all":
        return None
    if mask is None:
        if train_on == "assistant":
            raise Npgpt2Error(f"{what} assistant: {source} has no loss mask (encode it with --format chat)")
        return None
    if not mask.any():
        raise Npgpt2Error(f"{source}: the loss mask has no 1s: no token to train on ({what} all trains on every token)")
    return mask


def load_training_data(cfg, tokenizer, model_dir=None):
    """train()'s datasets: (tokens, mask, val tokens or None, val mask, chat template or None).

    The masks follow cfg.train_on (training_mask); the template is the dataset's (the one it
    was encoded with), else the starting model folder's chat.json, else None."""
    tokens, mask, template = load_masked_dataset(cfg.dataset, tokenizer, cfg.encoding, cfg.combine, "--dataset",
                                                 cfg.keep_crlf)
    mask = training_mask(cfg.train_on, mask, cfg.dataset)
    val = val_mask = None
    if cfg.val_dataset:
        val, val_mask, _ = load_masked_dataset(cfg.val_dataset, tokenizer, cfg.encoding, cfg.combine,
                                               "--val_dataset", cfg.keep_crlf)
        val_mask = training_mask("all" if mask is None else None, val_mask, cfg.val_dataset, "--val_dataset")
    if mask is not None:
        log.info("loss mask: %d of %d tokens are trained on (--train_on assistant)", int(mask.sum()), mask.size)
    if template is None and model_dir is not None:
        template = chat.read_template(model_dir)
    return tokens, mask, val, val_mask, template
