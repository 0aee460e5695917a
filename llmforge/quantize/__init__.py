"""llmforge.quantize — post-training weight quantization of the final model.

* ``layout``      the standard GPTQ tensor layout (pack / unpack / dequantize), its one definition
* ``spec``        ``QuantSpec`` and every shape check made before any work
* ``backend``     the ``QuantBackend`` protocol; ``gptq`` (gptqmodel) and ``rtn`` (our round-to-nearest) implement it
* ``calibration`` calibration sequences (token shards or SFT conversations) and held-out evaluation windows
* ``evaluate``    perplexity and size on disk
* ``load``        GPTQ checkpoint → llmforge ``Llama`` (dequantize on load); ``load_model`` for any checkpoint
* ``stage``       ``run_quantize``, the pipeline stage

Importing this package imports nothing heavy; each module imports torch / gptqmodel when used.
"""
