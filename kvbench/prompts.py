"""Turn (context, question, answer prefix) into token ids, split where the context ends.

With a chat template the user message is `context + question`; we render the template once and cut the
text where the context ends, so the context part can be prefilled and compressed on its own
(query_aware=false) and the question part fed afterwards. Multi-turn conversations are rendered
incrementally: each turn's new text is the difference between successive renderings.
"""
from __future__ import annotations


class PromptBuilder:
    def __init__(self, tokenizer, use_chat_template: bool = True):
        self.tok = tokenizer
        self.chat = use_chat_template and bool(getattr(tokenizer, "chat_template", None))

    def _render(self, messages, add_generation_prompt: bool) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def encode(self, text: str, first: bool = False) -> list[int]:
        # The chat template already contains the special tokens; raw prompts get the tokenizer's BOS once.
        return self.tok(text, add_special_tokens=(first and not self.chat))["input_ids"]

    def first_turn(self, context: str, question: str, answer_prefix: str, chat: bool = True) -> tuple[str, str]:
        """(context_text, question_text): their concatenation is the full prompt up to the answer."""
        if not (self.chat and chat):
            return context, question + answer_prefix
        full = self._render([{"role": "user", "content": context + question}], True)
        cut = full.find(context + question)
        if cut < 0:
            raise ValueError("chat template does not contain the user message verbatim; set chat_template=false")
        cut += len(context)
        return full[:cut], full[cut:] + answer_prefix

    def next_turn(self, history: list[dict], question: str, answer_prefix: str, chat: bool = True) -> str:
        """Text to append after the previous golden answer so that the next question can be answered."""
        if not (self.chat and chat):
            return "\n\n" + question + answer_prefix
        before = self._render(history, False)
        after = self._render(history + [{"role": "user", "content": question}], True)
        if not after.startswith(before):
            raise ValueError("chat template is not incremental across turns; set chat_template=false")
        return after[len(before):] + answer_prefix

    def golden_answer(self, history: list[dict], answer: str, answer_prefix: str, chat: bool = True) -> str:
        """Text of a golden answer closing the current turn (the prefix was already fed with the question)."""
        if not (self.chat and chat):
            return " " + answer if not answer_prefix else answer
        before = self._render(history, True)
        after = self._render(history + [{"role": "assistant", "content": answer_prefix + answer}], False)
        if not after.startswith(before + answer_prefix):
            raise ValueError("chat template is not incremental across turns; set chat_template=false")
        return after[len(before) + len(answer_prefix):]
