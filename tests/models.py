"""The tables every test uses."""

from __future__ import annotations

from sqlalchemy import ForeignKeyConstraint, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "alchemy_scope_items"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)


class Owner(Base):
    __tablename__ = "alchemy_scope_owners"

    id: Mapped[int] = mapped_column(primary_key=True)


class Pet(Base):
    """A pet whose owner is checked only at COMMIT (deferred foreign key).

    MariaDB has no deferred constraints: there the table has no foreign key at all.
    """

    __tablename__ = "alchemy_scope_pets"
    __table_args__ = (
        # SQLAlchemy documents a tuple of dialect names for ddl_if(); its annotation says one str.
        ForeignKeyConstraint(
            ["owner_id"], [Owner.id], deferrable=True, initially="DEFERRED"
        ).ddl_if(dialect=("postgresql", "sqlite")),  # type: ignore[arg-type]
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    owner_id: Mapped[int]
