"""compeft_format: a compact, checksummed file format for ComPEFT sparse ternary task vectors.

>>> import numpy as np, compeft_format as cf
>>> t = cf.TernaryTensor((2, 3), [0, 4], [False, True], 0.25)
>>> cf.loads(cf.dumps({"w": t}))["w"] == t
True
"""

from ._spec import VERSION_MAJOR, VERSION_MINOR, ReadLimits
from ._version import __version__
from .batch import compress_many
from .compress import compress, compression_metadata, iter_compress, select_topk
from .container import (
    BlockInfo,
    CompeftReader,
    FileInfo,
    TensorInfo,
    Writer,
    dumps,
    inspect,
    iter_stream,
    load_file,
    loads,
    open_file,
    save_file,
)
from .convert import (
    CompressSummary,
    ConvertError,
    DecompressSummary,
    compress_file,
)
from .errors import (
    BadMagicError,
    ChecksumError,
    CompeftError,
    CorruptDataError,
    EncodeError,
    FormatError,
    LimitExceededError,
    MergeError,
    TruncatedError,
    UnsupportedError,
    UnsupportedFeatureError,
    UnsupportedVersionError,
)
from .hifi import HifiError, load_hifi, lora_weights, probe_weights, save_hifi
from .merge_compress import merge_and_compress
from .merge_io import MergeSummary, merge_files
from .quality import QualityReport, TensorQuality, quality_report
from .restore import decompress_file
from .safetensors_io import (
    SafetensorsError,
    SafetensorsReader,
    SafetensorsWriter,
    open_safetensors,
    save_safetensors,
)
from .taskvec import (
    LazyTaskVector,
    TaskVector,
    TaskVectorReport,
    apply_task_vector,
    peft_task_vector,
    state_dict_task_vector,
)
from .tensor import TernaryTensor

FORMAT_VERSION = f"{VERSION_MAJOR}.{VERSION_MINOR}"

__all__ = [
    "FORMAT_VERSION",
    "BadMagicError",
    "BlockInfo",
    "ChecksumError",
    "CompeftError",
    "CompeftReader",
    "CompressSummary",
    "ConvertError",
    "CorruptDataError",
    "DecompressSummary",
    "EncodeError",
    "FileInfo",
    "FormatError",
    "HifiError",
    "LazyTaskVector",
    "LimitExceededError",
    "MergeError",
    "MergeSummary",
    "QualityReport",
    "ReadLimits",
    "SafetensorsError",
    "SafetensorsReader",
    "SafetensorsWriter",
    "TaskVector",
    "TaskVectorReport",
    "TensorInfo",
    "TensorQuality",
    "TernaryTensor",
    "TruncatedError",
    "UnsupportedError",
    "UnsupportedFeatureError",
    "UnsupportedVersionError",
    "Writer",
    "__version__",
    "apply_task_vector",
    "compress",
    "compress_file",
    "compress_many",
    "compression_metadata",
    "decompress_file",
    "dumps",
    "inspect",
    "iter_compress",
    "iter_stream",
    "load_file",
    "load_hifi",
    "loads",
    "lora_weights",
    "merge_and_compress",
    "merge_files",
    "open_file",
    "open_safetensors",
    "peft_task_vector",
    "probe_weights",
    "quality_report",
    "save_file",
    "save_hifi",
    "save_safetensors",
    "select_topk",
    "state_dict_task_vector",
]
