using Npgsql;

namespace OrleansIdempotency.Silo.Storage;

/// <summary>The PostgreSQL database that holds idempotency records: one pooled data source per process.</summary>
public sealed class IdempotencyDatabase(string connectionString) : IAsyncDisposable
{
    /// <summary>Opens connections to the database.</summary>
    public NpgsqlDataSource DataSource { get; } = NpgsqlDataSource.Create(connectionString);

    public ValueTask DisposeAsync() => DataSource.DisposeAsync();
}
