from __future__ import annotations

from sqlalchemy import CheckConstraint, ForeignKey, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "example_account"
    __table_args__ = (CheckConstraint("balance >= 0", name="example_balance_not_negative"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    owner: Mapped[str] = mapped_column(String(100), unique=True)
    balance: Mapped[int] = mapped_column(default=0)


class Transfer(Base):
    __tablename__ = "example_transfer"

    id: Mapped[int] = mapped_column(primary_key=True)
    source_id: Mapped[int] = mapped_column(ForeignKey("example_account.id"))
    target_id: Mapped[int] = mapped_column(ForeignKey("example_account.id"))
    amount: Mapped[int]
