using System.Text.Json;
using Npgsql;

namespace OrleansIdempotency.Api.Demo;

/// <summary>The demo's store in PostgreSQL (<c>ConnectionStrings:Postgres</c>); its schema is applied on start.</summary>
internal sealed partial class PostgresDemoStore(NpgsqlDataSource dataSource, ILogger<PostgresDemoStore> logger) : IDemoStore, IHostedService
{
    private static readonly JsonSerializerOptions Json = new(JsonSerializerDefaults.Web);

    public async Task AddOrderAsync(string user, string? requestKey, Order order, CancellationToken cancellationToken)
    {
        await using var connection = await dataSource.OpenConnectionAsync(cancellationToken);
        await using var batch = new NpgsqlBatch(connection)
        {
            BatchCommands =
            {
                Command("""
                    INSERT INTO demo_orders (id, user_id, request_key, customer_id, amount, items, created_at)
                    VALUES (@id, @user, @key, @customer, @amount, @items::jsonb, @created)
                    """,
                    ("id", order.Id), ("user", user), ("key", (object?)requestKey ?? DBNull.Value), ("customer", order.CustomerId),
                    ("amount", order.Amount), ("items", JsonSerializer.Serialize(order.Items, Json)), ("created", order.CreatedAt)),
                Command("INSERT INTO demo_charges (id, user_id, order_id, amount, created_at) VALUES (@id, @user, @order, @amount, @created)",
                    ("id", Guid.CreateVersion7().ToString()), ("user", user), ("order", order.Id), ("amount", order.Amount), ("created", order.CreatedAt)),
            },
        };
        // One batch is one implicit transaction: the order and its charge land together or not at all.
        await WriteAsync(batch.ExecuteNonQueryAsync(cancellationToken));
    }

    public async Task<IReadOnlyList<Order>> GetOrdersAsync(string user, CancellationToken cancellationToken) =>
        await ReadOrdersAsync("SELECT id, customer_id, amount, items, created_at FROM demo_orders WHERE user_id = @user ORDER BY created_at, id",
            cancellationToken, ("user", user));

    public async Task<Order?> GetOrderAsync(string user, string id, CancellationToken cancellationToken) =>
        (await ReadOrdersAsync("SELECT id, customer_id, amount, items, created_at FROM demo_orders WHERE user_id = @user AND id = @id",
            cancellationToken, ("user", user), ("id", id))).SingleOrDefault();

    public async Task AddPaymentAsync(string user, string? requestKey, Payment payment, CancellationToken cancellationToken)
    {
        await using var connection = await dataSource.OpenConnectionAsync(cancellationToken);
        await using var command = new NpgsqlCommand(
            "INSERT INTO demo_payments (id, user_id, request_key, amount, currency, created_at) VALUES (@id, @user, @key, @amount, @currency, @created)",
            connection);
        Add(command.Parameters, ("id", payment.Id), ("user", user), ("key", (object?)requestKey ?? DBNull.Value),
            ("amount", payment.Amount), ("currency", payment.Currency), ("created", payment.CreatedAt));
        await WriteAsync(command.ExecuteNonQueryAsync(cancellationToken));
    }

    public async Task<IReadOnlyList<Payment>> GetPaymentsAsync(string user, CancellationToken cancellationToken)
    {
        await using var command = dataSource.CreateCommand(
            "SELECT id, amount, currency, created_at FROM demo_payments WHERE user_id = @user ORDER BY created_at, id");
        Add(command.Parameters, ("user", user));
        await using var reader = await command.ExecuteReaderAsync(cancellationToken);
        var payments = new List<Payment>();
        while (await reader.ReadAsync(cancellationToken))
        {
            payments.Add(new Payment(reader.GetString(0), reader.GetDecimal(1), reader.GetString(2), reader.GetFieldValue<DateTimeOffset>(3)));
        }

        return payments;
    }

    public async Task<int> CountChargesAsync(string user, CancellationToken cancellationToken)
    {
        await using var command = dataSource.CreateCommand("SELECT count(*) FROM demo_charges WHERE user_id = @user");
        Add(command.Parameters, ("user", user));
        return Convert.ToInt32(await command.ExecuteScalarAsync(cancellationToken), System.Globalization.CultureInfo.InvariantCulture);
    }

    /// <summary>How long a starting API waits for PostgreSQL, as a silo does: 60 seconds.</summary>
    public TimeSpan StartupTimeout { get; init; } = TimeSpan.FromSeconds(60);

    public async Task StartAsync(CancellationToken cancellationToken)
    {
        // A time, not a count of attempts: each may wait a whole connect time-out on a server that does not answer.
        var waiting = System.Diagnostics.Stopwatch.StartNew();
        using var stream = typeof(PostgresDemoStore).Assembly.GetManifestResourceStream("DemoSchema.sql")!;
        using var reader = new StreamReader(stream);
        var schema = await reader.ReadToEndAsync(cancellationToken);
        for (var attempt = 1; ; attempt++)
        {
            try
            {
                await using var connection = await dataSource.OpenConnectionAsync(cancellationToken);
                await using var transaction = await connection.BeginTransactionAsync(cancellationToken);
                // Several API nodes may start together; CREATE .. IF NOT EXISTS is not safe against itself without a lock.
                await using (var lockCommand = new NpgsqlCommand("SELECT pg_advisory_xact_lock(1147500911)", connection, transaction))
                {
                    await lockCommand.ExecuteNonQueryAsync(cancellationToken);
                }

                await using (var command = new NpgsqlCommand(schema, connection, transaction))
                {
                    await command.ExecuteNonQueryAsync(cancellationToken);
                }

                await transaction.CommitAsync(cancellationToken);
                return;
            }
            catch (NpgsqlException ex) when (ex.IsTransient && waiting.Elapsed < StartupTimeout)
            {
                LogWaiting(logger, attempt, ex.Message);
                await Task.Delay(TimeSpan.FromSeconds(1), cancellationToken);
            }
        }
    }

    public Task StopAsync(CancellationToken cancellationToken) => Task.CompletedTask;

    private async Task<IReadOnlyList<Order>> ReadOrdersAsync(string sql, CancellationToken cancellationToken, params (string Name, object Value)[] parameters)
    {
        await using var command = dataSource.CreateCommand(sql);
        Add(command.Parameters, parameters);
        await using var reader = await command.ExecuteReaderAsync(cancellationToken);
        var orders = new List<Order>();
        while (await reader.ReadAsync(cancellationToken))
        {
            orders.Add(new Order(reader.GetString(0), reader.GetString(1), reader.GetDecimal(2),
                JsonSerializer.Deserialize<List<OrderItem>>(reader.GetString(3), Json) ?? [], reader.GetFieldValue<DateTimeOffset>(4)));
        }

        return orders;
    }

    // A write on an open connection: a failure from here on may follow its commit. (Opening it fails before anything is
    // sent, and is safe to retry.)
    private static async Task WriteAsync(Task<int> writing)
    {
        try
        {
            await writing;
        }
        catch (Exception ex) when (DemoWriteInDoubtException.LeavesTheWriteUnknown(ex))
        {
            throw new DemoWriteInDoubtException(ex);
        }
    }

    private static NpgsqlBatchCommand Command(string sql, params (string Name, object Value)[] parameters)
    {
        var command = new NpgsqlBatchCommand(sql);
        Add(command.Parameters, parameters);
        return command;
    }

    private static void Add(NpgsqlParameterCollection collection, params (string Name, object Value)[] parameters)
    {
        foreach (var (name, value) in parameters)
        {
            collection.AddWithValue(name, value);
        }
    }

    [LoggerMessage(Level = LogLevel.Warning, Message = "PostgreSQL is not reachable yet for the demo schema (attempt {Attempt}): {Reason}")]
    private static partial void LogWaiting(ILogger logger, int attempt, string reason);
}
