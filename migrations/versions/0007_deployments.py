"""deployments: serving instances and the adapter versions each has loaded

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03 17:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op


revision: str = '0007'
down_revision: str | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('deployments',
    sa.Column('instance_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('host', sqlmodel.sql.sqltypes.AutoString(length=255), nullable=False),
    sa.Column('port', sa.Integer(), nullable=True),
    sa.Column('engine', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('engine_version', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('served_model', sqlmodel.sql.sqltypes.AutoString(length=1024), nullable=False),
    sa.Column('base_signature', sqlmodel.sql.sqltypes.AutoString(length=71), nullable=True),
    sa.Column('reported_by', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=True),
    sa.Column('first_seen_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_seen_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('instance_id')
    )
    op.create_table('deployment_adapters',
    sa.Column('instance_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('name', sqlmodel.sql.sqltypes.AutoString(length=300), nullable=False),
    sa.Column('reference', sqlmodel.sql.sqltypes.AutoString(length=300), nullable=False),
    sa.Column('adapter', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('digest', sqlmodel.sql.sqltypes.AutoString(length=71), nullable=False),
    sa.Column('loaded_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['instance_id'], ['deployments.instance_id'], ),
    sa.PrimaryKeyConstraint('instance_id', 'name')
    )
    with op.batch_alter_table('deployment_adapters', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_deployment_adapters_adapter'), ['adapter'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('deployment_adapters', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_deployment_adapters_adapter'))
    op.drop_table('deployment_adapters')
    op.drop_table('deployments')
