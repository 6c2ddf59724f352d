"""The capabilities of PostgreSQL (through ``postgresql+pgwarden``) for SQLAlchemy's suite.

SQLAlchemy's own ``test/requirements.py`` (``DefaultRequirements``, not shipped in the
wheel) answers these for every backend it knows. Evaluated for ``postgresql+psycopg``
on SQLAlchemy 2.1.9 against a real server, it opens exactly the requirements listed in
``OPEN`` that `SuiteRequirements` closes, plus ``computed_columns`` (with its warning
before PostgreSQL 18, as here) and ``async_dialect`` for the asyncio variant; it closes
none that `SuiteRequirements` opens. (``infinity_floats`` is open there for
``postgresql+psycopg`` by driver name; ours is that driver.) This class opens the same,
so the compliance suite runs every test SQLAlchemy's own psycopg dialect runs, and
skips only what SQLAlchemy's own run skips for psycopg (10 tests on 2.1.9: features
of other databases, and one marked skip in the suite itself; see docs/sqlalchemy.md).
On SQLAlchemy 2.0 (measured on 2.0.30, the lowest version pgwarden allows) the same
comparison keeps ``OPEN_SINCE_2_1`` closed; there the suite runs what SQLAlchemy's own
run does too (1433 passed, 99 skipped, for psycopg and pgwarden alike).
"""

from __future__ import annotations

from typing import Any

import sqlalchemy
from sqlalchemy.testing import exclusions
from sqlalchemy.testing.requirements import SuiteRequirements

#: Closed by `SuiteRequirements`, open in SQLAlchemy's own run for psycopg.
OPEN = (
    "aggregate_order_by",
    "array_type",
    "autocommit",
    "boolean_col_expressions",
    "cast_precision_numerics_many_significant_digits",
    "check_constraint_reflection",
    "column_collation_reflection",
    "comment_reflection",
    "comment_reflection_full_unicode",
    "computed_columns_default_persisted",
    "computed_columns_reflect_persisted",
    "computed_columns_stored",
    "constraint_comment_reflection",
    "create_or_replace_view",
    "create_table_as",
    "create_temp_table_as",
    "cross_schema_fk_reflection",
    "ctes",
    "ctes_on_dml",
    "ctes_with_update_delete",
    "ctes_with_values",
    "date_historic",
    "datetime_historic",
    "datetime_interval",
    "datetime_literals",
    "datetime_timezone",
    "datetime_timezone_historic",
    "default_schema_name_switch",
    "deferrable_fks",
    "except_",
    "expression_server_defaults",
    "fetch_expression",
    "fetch_first",
    "fetch_no_order_by",
    "fetch_offset_with_options",
    "fetch_ties",
    "fk_constraint_option_reflection_ondelete_noaction",
    "fk_constraint_option_reflection_ondelete_restrict",
    "fk_constraint_option_reflection_onupdate_restrict",
    "float_or_double_precision_behaves_generically",
    "foreign_key_constraint_name_reflection",
    "foreign_key_constraint_option_reflection_ondelete",
    "foreign_key_constraint_option_reflection_onupdate",
    "has_temp_table",
    "identity_columns",
    "identity_columns_standard",
    "implicit_default_schema",
    "index_ddl_if_exists",
    "index_reflects_included_columns",
    "indexes_check_column_order",
    "indexes_with_expressions",
    "infinity_floats",
    "inline_check_constraint_reflection",
    "intersect",
    "isolation_level",
    "json_array_indexes",
    "json_deserializer_binary",
    "json_type",
    "legacy_unconditional_json_extract",
    "materialized_views",
    "nullsordering",
    "order_by_collation",
    "percent_schema_names",
    "precision_numerics_enotation_small",
    "precision_numerics_many_significant_digits",
    "precision_numerics_retains_significant_digits",
    "reflect_indexes_with_expressions",
    "reflect_table_options",
    "reflect_tables_no_columns",
    "reflects_pk_names",
    "regexp_match",
    "regexp_replace",
    "repeated_column_foreign_keys",
    "savepoints",
    "schema_create_delete",
    "server_defaults",
    "skip_autocommit_rollback",
    "supports_bitwise_and",
    "supports_bitwise_not",
    "supports_bitwise_or",
    "supports_bitwise_shift",
    "supports_bitwise_xor",
    "supports_distinct_on",
    "table_ddl_if_exists",
    "table_value_constructor",
    "temp_table_comment_reflection",
    "temp_table_names",
    "temporary_views",
    "time_timezone",
    "tuple_in",
    "tuple_in_w_empty",
    "unicode_ddl",
    "unique_constraints_reflect_as_index",
    "update_from",
    "uuid_data_type",
    "view_column_reflection",
    "view_reflection",
    "views",
    "window_functions",
    "window_range",
    "window_range_non_numeric",
    "window_range_numeric",
)


#: Of those, the one SQLAlchemy 2.0 (2.0.30) keeps closed for PostgreSQL (in 2.0 its
#: test expects other reflected options); the others 2.0 does not know, or opens too.
OPEN_SINCE_2_1 = ("reflect_table_options",)


def _open(self: Any) -> Any:
    return exclusions.open()  # type: ignore[no-untyped-call]


class Requirements(SuiteRequirements):
    """`SuiteRequirements` with PostgreSQL's capabilities open."""

    @property
    def computed_columns(self) -> Any:
        """As SQLAlchemy's own: PostgreSQL 12+, and (2.1) before 18 the STORED warning."""
        supported = exclusions.skip_if("postgresql < 12")  # type: ignore[no-untyped-call]
        if not hasattr(exclusions, "warns_if"):  # SQLAlchemy 2.0: no VIRTUAL columns yet
            return supported
        return supported + exclusions.warns_if(  # type: ignore[no-untyped-call]
            "postgresql < 18", r".*PostgreSQL version does not support VIRTUAL", assert_=False
        )

    def get_order_by_collation(self, config: Any) -> str:
        """A collation for ORDER BY ... COLLATE (SQLAlchemy's own choice for PostgreSQL)."""
        return "POSIX"

    @property
    def async_dialect(self) -> Any:
        """The asyncio variant (``postgresql+pgwarden_async``) runs the async tests."""
        return exclusions.only_if(  # type: ignore[no-untyped-call]
            lambda config: bool(config.db.dialect.is_async), "async dialect required"
        )


_SQLALCHEMY_2_0 = tuple(int(p) for p in sqlalchemy.__version__.split(".")[:2]) < (2, 1)
for _name in OPEN:
    if not (_SQLALCHEMY_2_0 and _name in OPEN_SINCE_2_1):
        setattr(Requirements, _name, property(_open, doc=f"open on PostgreSQL: {_name}"))
