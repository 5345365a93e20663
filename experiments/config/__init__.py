"""A study's configuration: the dataclasses and their overrides (`config`), the schema that checks a YAML or
command-line value against them (`schema`), and strict YAML reading (`yamlfile`)."""
