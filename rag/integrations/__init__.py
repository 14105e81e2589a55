"""Adapters to other frameworks: :mod:`blockrag.integrations.langchain` (langchain-core) and
:mod:`blockrag.integrations.llamaindex` (llama-index-core, optional extra ``llamaindex``)."""
