"""Applications, the top layer: the ``code-seg`` command line (``cli``), the Gradio demo (``demo``), publishing
to the Hub (``publishing``, with the model card of ``model_card`` and ``model_card_template.md``), conversion of
the original release's checkpoints (``conversion``) and the glibc allocator setting of long-running processes
(``allocator``). Modules here may import any layer; nothing below imports them, and optional packages (gradio,
pandas) are imported only by the module that uses them.
"""
