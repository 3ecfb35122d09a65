using Microsoft.Extensions.DependencyInjection;

namespace OrleansIdempotency.Client;

/// <summary>Registers <see cref="IdempotencyKeyHandler"/> on a client from <c>IHttpClientFactory</c>.</summary>
public static class IdempotencyHttpClientBuilderExtensions
{
    /// <summary>
    /// Keys this client's POST and PATCH requests (see <see cref="IdempotencyKeyHandler"/>). Call it before adding a
    /// retrying handler, so that every retry of a request carries its key.
    /// </summary>
    public static IHttpClientBuilder AddIdempotencyKeys(this IHttpClientBuilder builder, IdempotencyKeyOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(builder);
        var chosen = options ?? new IdempotencyKeyOptions();
        IdempotencyKeyHandler.Validate(chosen);
        return builder.AddHttpMessageHandler(services => new IdempotencyKeyHandler(chosen, services.GetService<TimeProvider>() ?? TimeProvider.System));
    }
}
