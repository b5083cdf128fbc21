"""The error every conversion problem raises: it names the file, tensor or config field at fault."""


class ConvertError(ValueError):
  """A Hugging Face checkpoint or config that moeqjax cannot import or export faithfully."""
