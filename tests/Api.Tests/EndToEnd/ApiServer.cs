using System.Globalization;
using System.Net.Http.Headers;
using Microsoft.AspNetCore.Hosting;
using Microsoft.AspNetCore.Mvc.Testing;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.DependencyInjection;
using OrleansIdempotency.Grains;
using OrleansIdempotency.Testing;

namespace OrleansIdempotency.Api.Tests.EndToEnd;

/// <summary>
/// The demo API (src/Api's Program) on real Kestrel, on a free loopback port, configured by <paramref name="settings"/>,
/// in the Development environment unless <paramref name="environment"/> names another.
/// </summary>
public sealed class ApiServer(IReadOnlyDictionary<string, string?> settings, string environment = "Development") : WebApplicationFactory<Program>
{
    public int Port { get; } = FreePort.Next();

    public Uri BaseAddress => new($"http://127.0.0.1:{Port.ToString(CultureInfo.InvariantCulture)}");

    /// <summary>What the API logged as errors.</summary>
    public ErrorLog Errors { get; } = new();

    public static Task<ApiServer> StartAsync(IReadOnlyDictionary<string, string?> settings, string environment = "Development")
    {
        var server = new ApiServer(settings, environment);
        server.UseKestrel(server.Port);
        server.StartServer();
        return Task.FromResult(server);
    }

    /// <summary>A client that authenticates with <paramref name="apiKey"/> (<c>demo-alice</c>, <c>demo-bob</c>).</summary>
    public HttpClient Client(string? apiKey = "demo-alice")
    {
        var client = new HttpClient { BaseAddress = BaseAddress, Timeout = TimeSpan.FromSeconds(60) };
        if (apiKey is not null)
        {
            client.DefaultRequestHeaders.Authorization = new AuthenticationHeaderValue("Bearer", apiKey);
        }

        return client;
    }

    protected override void ConfigureWebHost(IWebHostBuilder builder)
    {
        builder.UseEnvironment(environment);
        builder.ConfigureLogging(logging => logging.AddProvider(Errors));
        foreach (var (key, value) in settings)
        {
            builder.UseSetting(key, value);
        }
    }
}

/// <summary>Real PostgreSQL and Redis, and one API node hosting a silo on them.</summary>
public sealed class EndToEndFixture : IAsyncLifetime
{
    private readonly ServersFixture servers = new();

    public ServersFixture Servers => servers;

    public ApiServer Api { get; private set; } = null!;

    public string Postgres { get; private set; } = "";

    public async Task InitializeAsync()
    {
        await servers.InitializeAsync();
        Postgres = await servers.Postgres.CreateDatabaseAsync();
        Api = await ApiServer.StartAsync(new Dictionary<string, string?>(FreePort.SiloEndpoints())
        {
            ["ConnectionStrings:Postgres"] = Postgres,
            ["ConnectionStrings:Redis"] = servers.Redis.ConnectionString,
            ["Orleans:ClusterId"] = "e2e-" + Guid.NewGuid().ToString("N")[..8],
            ["Logging:LogLevel:Default"] = "Error",
        });
    }

    public async Task DisposeAsync()
    {
        if (Api is not null)
        {
            await Api.DisposeAsync();
        }

        await servers.DisposeAsync();
    }

    /// <summary>Waits until alice's <paramref name="key"/> is claimed (its action running), asking its grain without claiming.</summary>
    public async Task WaitUntilInProgressAsync(string key)
    {
        var grain = Api.Services.GetRequiredService<IGrainFactory>().GetIdempotencyGrain(new IdempotencyKey("user:alice", key));
        var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(10);
        while ((await grain.GetAsync()).Status != IdempotencyStatus.InProgress)
        {
            Assert.True(DateTime.UtcNow < deadline, $"{key} was never seen in progress.");
            await Task.Delay(10);
        }
    }

    /// <summary>How many rows of <paramref name="table"/> the request with <paramref name="key"/> created.</summary>
    public async Task<long> CountAsync(string table, string key)
    {
        await using var connection = new Npgsql.NpgsqlConnection(Postgres);
        await connection.OpenAsync();
        await using var command = new Npgsql.NpgsqlCommand($"SELECT count(*) FROM {table} WHERE request_key = @key", connection);
        command.Parameters.AddWithValue("key", key);
        return (long)(await command.ExecuteScalarAsync())!;
    }
}

[CollectionDefinition(Name)]
public sealed class EndToEndCollection : ICollectionFixture<EndToEndFixture>
{
    public const string Name = "end-to-end";
}
