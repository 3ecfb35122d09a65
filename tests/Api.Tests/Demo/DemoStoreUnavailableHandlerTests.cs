using System.Text.Json;
using Microsoft.AspNetCore.Http;
using Microsoft.Extensions.DependencyInjection;
using Npgsql;
using OrleansIdempotency.Api.Demo;

namespace OrleansIdempotency.Api.Tests.Demo;

public sealed class DemoStoreUnavailableHandlerTests
{
    private static (DemoStoreUnavailableHandler Handler, HttpContext Context) Create()
    {
        var services = new ServiceCollection().AddLogging().AddProblemDetails().BuildServiceProvider();
        var context = new DefaultHttpContext { RequestServices = services };
        context.Response.Body = new MemoryStream();
        return (new DemoStoreUnavailableHandler(services.GetRequiredService<Microsoft.AspNetCore.Http.IProblemDetailsService>()), context);
    }

    [Fact]
    public async Task TransientDatabaseFailure_Answers503ProblemWithRetryAfter()
    {
        var (handler, context) = Create();

        var handled = await handler.TryHandleAsync(context, new NpgsqlException("connection refused", new System.Net.Sockets.SocketException(111)), default);

        Assert.True(handled);
        Assert.Equal(503, context.Response.StatusCode);
        Assert.Equal("1", context.Response.Headers.RetryAfter);
        Assert.Equal("application/problem+json", context.Response.ContentType);
        var problem = JsonDocument.Parse(((MemoryStream)context.Response.Body).ToArray()).RootElement;
        Assert.Equal(503, problem.GetProperty("status").GetInt32());
    }

    [Fact]
    public void ServerShuttingDownOrConnectionLost_IsUnreachable_ButAnAnswerAboutTheDataIsNot()
    {
        Assert.True(DemoStoreUnavailableHandler.IsDatabaseUnreachable(new PostgresException("terminating", "FATAL", "FATAL", PostgresErrorCodes.AdminShutdown)));
        Assert.True(DemoStoreUnavailableHandler.IsDatabaseUnreachable(new PostgresException("starting up", "FATAL", "FATAL", PostgresErrorCodes.CannotConnectNow)));
        Assert.True(DemoStoreUnavailableHandler.IsDatabaseUnreachable(new PostgresException("lost", "FATAL", "FATAL", PostgresErrorCodes.ConnectionFailure)));
        Assert.True(DemoStoreUnavailableHandler.IsDatabaseUnreachable(new NpgsqlException("Exception while reading from stream", new IOException())));
        Assert.False(DemoStoreUnavailableHandler.IsDatabaseUnreachable(new PostgresException("duplicate key", "ERROR", "ERROR", PostgresErrorCodes.UniqueViolation)));
        Assert.False(DemoStoreUnavailableHandler.IsDatabaseUnreachable(new InvalidOperationException()));
    }

    [Fact]
    public async Task WriteOfUnknownOutcome_Answers503_WithoutInvitingARetry()
    {
        var (handler, context) = Create();
        var lost = new DemoWriteInDoubtException(new NpgsqlException("Exception while reading from stream", new IOException()));

        Assert.True(await handler.TryHandleAsync(context, lost, default));

        Assert.Equal(503, context.Response.StatusCode);
        Assert.False(context.Response.Headers.ContainsKey("Retry-After"));
        var problem = JsonDocument.Parse(((MemoryStream)context.Response.Body).ToArray()).RootElement;
        Assert.Contains("unknown", problem.GetProperty("detail").GetString(), StringComparison.Ordinal);
    }

    [Fact]
    public void WriteFailure_LeavesItsOutcomeUnknown_OnlyWhenTheConnectionFailed_NotWhenPostgresAnswered()
    {
        Assert.True(DemoWriteInDoubtException.LeavesTheWriteUnknown(new NpgsqlException("Exception while reading from stream", new IOException())));
        Assert.True(DemoWriteInDoubtException.LeavesTheWriteUnknown(new NpgsqlException("Exception while reading from stream", new TimeoutException())));
        Assert.True(DemoWriteInDoubtException.LeavesTheWriteUnknown(new TimeoutException()));
        Assert.False(DemoWriteInDoubtException.LeavesTheWriteUnknown(new PostgresException("terminating", "FATAL", "FATAL", PostgresErrorCodes.AdminShutdown)));
        Assert.False(DemoWriteInDoubtException.LeavesTheWriteUnknown(new PostgresException("duplicate key", "ERROR", "ERROR", PostgresErrorCodes.UniqueViolation)));
    }

    [Fact]
    public async Task OtherExceptions_AreLeftToTheDefaultHandler()
    {
        var (handler, context) = Create();

        Assert.False(await handler.TryHandleAsync(context, new InvalidOperationException("a bug"), default));
        Assert.Equal(200, context.Response.StatusCode);
    }
}
